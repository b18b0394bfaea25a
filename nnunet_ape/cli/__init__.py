"""The ``nnunet-ape`` command line: :mod:`nnunet_ape.cli.main` assembles one module per command."""

from nnunet_ape.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
