"""Jobs over a data set go on where they stopped: cases whose output exists (written atomically, so complete) are kept."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

Case = TypeVar("Case")


def unfinished(cases: list[Case], done_mark: Callable[[Case], Path], overwrite: bool, what: str) -> list[Case]:
    """The cases whose ``done_mark`` file does not exist (all with ``overwrite``); says on stdout how many were kept,
    naming them ``what`` (e.g. "maps")."""
    todo = [c for c in cases if overwrite or not done_mark(c).exists()]
    if len(todo) < len(cases):
        print(f"{len(cases) - len(todo)} of {len(cases)} {what} exist already and are kept (--overwrite redoes them)")
    return todo
