"""An organ mask kept as its bounding-box crop: what recall and alpha calibration need, in a fraction of the memory.

A full boolean mask of a 512x512x300 CT takes 79 MB; fitting a localizer keeps one per organ and shot. The crop of
a liver is a few MB, of a kidney well under one.
"""

from __future__ import annotations

import numpy as np

from nnunet_ape.localize.boxes import mask_box


class CroppedMask:
    """A 3D boolean mask stored as the crop ``(x, y, z)`` of its bounding box and the crop's offset.

    Behaves like the full mask where :mod:`nnunet_ape.localize.boxes` reads one: ``shape`` is the full image
    shape, ``sum()`` counts the organ's voxels (``sum(axis=(0, 1))`` per slice) and indexing with a tuple of 3 slices (step 1) returns the organ
    voxels inside that region (the part of the crop it covers).
    """

    def __init__(self, mask: np.ndarray) -> None:
        """``mask``: boolean ``(X, Y, Z)``, not empty."""
        box = mask_box(mask).astype(int)
        self.offset = box[0]
        self.crop = np.ascontiguousarray(mask[tuple(slice(a, b + 1) for a, b in zip(box[0], box[1]))], dtype=bool)
        self.shape = tuple(int(n) for n in mask.shape)

    def sum(self, axis: tuple[int, int] | None = None) -> int | np.ndarray:
        """Number of organ voxels; with ``axis=(0, 1)`` the count per slice, ``(Z,)`` over the full image."""
        if axis is None:
            return int(self.crop.sum())
        if tuple(axis) != (0, 1):
            raise ValueError("CroppedMask sums over all axes or over axis=(0, 1) only")
        per_slice = np.zeros(self.shape[2], dtype=np.int64)
        per_slice[self.offset[2] : self.offset[2] + self.crop.shape[2]] = self.crop.sum(axis=(0, 1))
        return per_slice

    def __getitem__(self, region: tuple[slice, slice, slice]) -> np.ndarray:
        local = []
        for axis, s in enumerate(region):
            start, stop, step = s.indices(self.shape[axis])
            if step != 1:
                raise ValueError("CroppedMask supports slices with step 1 only")
            lo, hi = start - self.offset[axis], stop - self.offset[axis]
            local.append(slice(max(lo, 0), max(hi, 0)))
        return self.crop[tuple(local)]

    def box(self) -> np.ndarray:
        """The mask's tight box ``(2, 3)`` (inclusive voxel indices of the full image): its crop's extent."""
        return np.stack([self.offset, self.offset + np.asarray(self.crop.shape) - 1]).astype(np.float64)

    def full(self) -> np.ndarray:
        """The full boolean mask ``(X, Y, Z)``."""
        out = np.zeros(self.shape, dtype=bool)
        out[tuple(slice(o, o + n) for o, n in zip(self.offset, self.crop.shape))] = self.crop
        return out
