"""Locks between nnunet-ape processes that write the same dataset or folder.

POSIX record locks (``fcntl.lockf``) on single bytes of a hidden lock file: the kernel drops a lock when its process
ends, however it ends (a SIGKILL leaves no stale lock behind), and one file serves several locks, one per byte (the
parts of a ``--num-parts`` job, and the step that assembles their output). A process keeps one descriptor per lock
file for its whole life: closing any descriptor of a file would drop every record lock the process holds on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from nnunet_ape.errors import InputError

_DESCRIPTORS: dict[str, int] = {}


def _descriptor(path: Path) -> int:
    """This process's descriptor of lock file ``path`` (created, with its folder, when missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key not in _DESCRIPTORS:
        _DESCRIPTORS[key] = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    return _DESCRIPTORS[key]


@contextlib.contextmanager
def locked(path: str | os.PathLike, slot: int = 0, busy: str | None = None) -> Iterator[None]:
    """Hold byte ``slot`` of lock file ``path`` exclusively while the block runs. When another process holds it:
    raise InputError(``busy``) at once if ``busy`` is given (a one-line refusal that says what to do), else wait."""
    fd = _descriptor(Path(path))
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0), 1, slot, os.SEEK_SET)
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another process holds it
        if busy is None:
            raise
        raise InputError(busy) from None
    try:
        yield
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, slot, os.SEEK_SET)


def plans_lock(preprocessed: Path, plans_identifier: str, command: str):
    """Context manager held by a process that writes the plans ``plans_identifier`` of a preprocessed dataset or
    data planned by them (``nnunet-ape plan``, ``preprocess``); InputError (a one-line refusal) when another process
    holds it. The lock file is ``nnunet_ape/<plans>.lock`` in the preprocessed dataset, a folder nnU-Net never reads."""
    path = Path(preprocessed) / "nnunet_ape" / f"{plans_identifier}.lock"
    return locked(path, 0, busy=f"{command}: another nnunet-ape plan or preprocess job is writing {Path(preprocessed).name}'s "
                                f"{plans_identifier} right now (it holds {path}); wait for it to finish")
