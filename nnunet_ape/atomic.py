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


def sweep(root: Path) -> list[Path]:
    """:func:`remove_leftovers` in ``root`` and in every folder below it (symlinked folders are not followed):
    what a job runs on a folder it writes before handing it over (renaming a dataset into place, a rerun).
    Returns what was removed."""
    removed: list[Path] = []
    for folder, dirs, _ in os.walk(root):
        dirs[:] = [d for d in dirs if d != STAGING and not os.path.islink(os.path.join(folder, d))]
        removed += remove_leftovers(Path(folder))
    return removed


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike, stem: str, suffixes: tuple[str, ...]) -> Iterator[str]:
    """For a writer that writes several files named ``PREFIX + suffix`` (nnU-Net's ``run_case_save``: ``.b2nd``,
    ``_seg.b2nd``, ``.pkl``): yield a PREFIX in the staging folder of ``folder``; on success move the files to
    ``folder/stem + suffix`` in the order of ``suffixes`` (each move atomic; put last the file whose presence says
    the set is complete), on error remove them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder)
    staging = folder / STAGING
    prefix = str(staging / f"{os.getpid()}_{stem}")
    for _attempt in range(10):
        staging.mkdir(exist_ok=True)
        marker = Path(prefix + ".busy")
        try:
            marker.touch()  # keeps the staging folder from being removed while the writer works
            break
        except FileNotFoundError:  # another writer removed the empty staging folder in between
            continue
    else:
        raise OSError(f"could not create a file in {staging}")
    try:
        yield prefix
        umask = os.umask(0)
        os.umask(umask)
        for suffix in suffixes:
            os.chmod(prefix + suffix, 0o666 & ~umask)
            os.replace(prefix + suffix, folder / f"{stem}{suffix}")
    finally:
        for suffix in (*suffixes, ".busy"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(prefix + suffix)
        with contextlib.suppress(OSError):
            staging.rmdir()


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
