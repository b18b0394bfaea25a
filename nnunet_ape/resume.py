"""Jobs over a data set go on where they stopped: cases whose output exists (written atomically, so complete) are kept."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

from nnunet_ape.atomic import remove_leftovers

Case = TypeVar("Case")


def unfinished(cases: list[Case], done_mark: Callable[[Case], Path], overwrite: bool, what: str) -> list[Case]:
    """The cases whose ``done_mark`` file does not exist (all with ``overwrite``); says on stdout how many were kept,
    naming them ``what`` (e.g. "maps"). Removes what killed runs left in the output folders first (their staging
    files), so a rerun leaves none behind even when it has nothing left to write."""
    for folder in {done_mark(c).parent for c in cases}:
        if folder.is_dir():
            remove_leftovers(folder)
    todo = [c for c in cases if overwrite or not done_mark(c).exists()]
    if len(todo) < len(cases):
        print(f"{len(cases) - len(todo)} of {len(cases)} {what} exist already and are kept (--overwrite redoes them)")
    return todo
