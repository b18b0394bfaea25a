"""Embedding maps spilled to disk and read back as memory maps, so a data set's maps need disk, not memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def spill(array: np.ndarray, folder: Path, name: str) -> np.ndarray:
    """Write ``array`` to ``folder/name.npy`` and return it as a read-only memory map (same shape and dtype).

    The folder must outlive every use of the returned map (a ``tempfile.TemporaryDirectory`` around the work).
    """
    path = Path(folder) / f"{name}.npy"
    np.save(path, np.ascontiguousarray(array))
    return np.load(path, mmap_mode="r")
