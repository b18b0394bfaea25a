"""One CT in canonical (LPS) order, made once per case and carried through the case's steps.

The APE network, BPR slice scores, the body box, retrieval and label transfer all work in canonical order
(:func:`nnunet_ape.io.to_canonical`: the CT's axes permuted and flipped to L, P, S). Each ``to_canonical`` of a
whole CT is a full copy of it, so a case's CT is brought there once, as a :class:`CanonicalCT`
(:func:`canonical_ct`), handed from step to step, and boxes and arrays go back to the CT's own grid once, at output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nnunet_ape.crop_geometry import box_from_canonical, box_to_canonical
from nnunet_ape.io import Orientation, Volume, canonical_array, from_canonical, to_canonical


@dataclass(frozen=True, eq=False)
class CanonicalCT:
    """A CT and its canonical copy.

    source: the CT as read, ``(X, Y, Z)`` in its own index order, with its own spacing, origin and direction (HU).
    canon: the same voxels in canonical order ``(X', Y', Z')``, with the canonical grid's spacing (mm per canonical
    axis), origin (mm, LPS, of canonical voxel 0) and direction; ``index_to_physical`` of a voxel agrees in both.
    orientation: the permutation and flips that take ``source``'s axes to ``canon``'s.
    """

    source: Volume
    canon: Volume
    orientation: Orientation

    def box_to_source(self, box: np.ndarray) -> np.ndarray:
        """A float box ``(2, 3)`` in canonical voxel indices -> the same voxels' box in the source's indices."""
        return box_from_canonical(box, self.orientation.perm, self.orientation.flip, self.source.shape)

    def box_to_canonical(self, box: np.ndarray) -> np.ndarray:
        """A float box ``(2, 3)`` in the source's voxel indices -> the same voxels' box in canonical indices."""
        return box_to_canonical(box, self.orientation.perm, self.orientation.flip, self.source.shape)

    def array_to_canonical(self, array: np.ndarray) -> np.ndarray:
        """An array ``(X, Y, Z[, C])`` on the source's grid (its label map) -> canonical order ``(X', Y', Z'[, C])``."""
        return canonical_array(array, self.orientation)

    def array_to_source(self, array: np.ndarray) -> np.ndarray:
        """An array ``(X', Y', Z'[, C])`` on the canonical grid -> the source's order ``(X, Y, Z[, C])``
        (C-contiguous)."""
        return from_canonical(array, self.orientation, self.source).array


def canonical_ct(ct: Volume | CanonicalCT) -> CanonicalCT:
    """A CT (HU, any orientation) with its canonical copy: one :func:`~nnunet_ape.io.to_canonical`. A CanonicalCT
    is returned as it is, so a function taking either converts only what it was not handed converted."""
    if isinstance(ct, CanonicalCT):
        return ct
    canon, orientation = to_canonical(ct)
    return CanonicalCT(ct, canon, orientation)
