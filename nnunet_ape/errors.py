"""User-facing errors: one line, says what is wrong and what to do."""


class InputError(ValueError):
    """Bad user input (file, folder, option). The CLI prints its message on one line and exits 2."""
