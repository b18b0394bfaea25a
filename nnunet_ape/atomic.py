"""Atomic file writing: write to a temporary file, then rename, so no torn output remains.

The temporary file lives in a hidden staging folder beside the target (``.nnunet_ape_partial/``, same file system,
so the rename is atomic), never beside it with the final suffix: nnU-Net lists a dataset's files by suffix
(``imagesTr/*.nii.gz``) and would take a file a killed job left there for a case. Staging files carry their
writer's process id; the next write into the folder removes those of writers that are gone, and the leftovers of
earlier versions (``.tmp_*`` files beside the targets).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

STAGING = ".nnunet_ape_partial"


def _alive(pid: int) -> bool:
    """Whether a process with id ``pid`` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove what killed writers left in ``folder``: staging files of processes that are gone, the staging folder
    when empty, and ``.tmp_*`` files of earlier versions (written beside their targets). Returns what was removed."""
    folder = Path(folder)
    removed = [p for p in folder.glob(".tmp_*") if p.is_file()]
    staging = folder / STAGING
    if staging.is_dir():
        for p in staging.iterdir():
            pid = p.name.split("_", 1)[0]
            if not (pid.isdigit() and _alive(int(pid))):
                removed.append(p)
    for p in removed:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    with contextlib.suppress(OSError):
        staging.rmdir()  # only when empty: other writers may be busy
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path (in the staging folder beside ``path``, same suffix, so writers that choose a format
    by suffix work) to write to; on success it replaces ``path`` with the usual file permissions, on error it is
    removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path.parent)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    staging = path.parent / STAGING
    for _attempt in range(10):
        staging.mkdir(exist_ok=True)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f"{os.getpid()}_", suffix=suffix, dir=staging)
            break
        except FileNotFoundError:  # another writer removed the empty staging folder in between
            continue
    else:
        raise OSError(f"could not create a temporary file in {staging}")
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        with contextlib.suppress(OSError):
            staging.rmdir()
