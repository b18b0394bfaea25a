"""Crop boxes on a volume's own voxel grid: orientation changes, integer crop boxes, cropping and pasting back.

Two box kinds appear in the project:

- a *float box* ``(2, 3)``: lowest and highest voxel index *included* along x, y, z (what localization predicts;
  float so that averaged and enlarged boxes need no rounding);
- a *crop box* ``(2, 3)`` int: ``lo`` included, ``hi`` excluded (Python slicing), never empty, inside the image.

A crop keeps the source's spacing and direction and moves the origin to the physical position of voxel ``lo``,
so it overlays its source exactly in a viewer, and :func:`paste` of a crop is the identity inside the box.
This module is the one place that geometry lives; crop datasets, trainers and the predictor all use it.
"""

from __future__ import annotations

import numpy as np

from nnunet_ape.io import Volume


def box_to_canonical(box: np.ndarray, perm: tuple[int, int, int], flip: tuple[bool, bool, bool], shape: tuple[int, int, int]) -> np.ndarray:
    """A box ``(2, 3)`` in an image's voxel indices -> the same box in canonical (LPS) indices, for the image's
    :class:`nnunet_ape.io.Orientation` (``perm``, ``flip``) and its own ``shape``."""
    corners = np.asarray(box, dtype=np.float64)[:, list(perm)].copy()
    for axis, flipped in enumerate(flip):
        if flipped:
            corners[:, axis] = shape[perm[axis]] - 1 - corners[::-1, axis]
    return corners


def box_from_canonical(box: np.ndarray, perm: tuple[int, int, int], flip: tuple[bool, bool, bool], shape: tuple[int, int, int]) -> np.ndarray:
    """Inverse of :func:`box_to_canonical`: a canonical box -> the image's voxel indices (``shape`` of the image)."""
    corners = np.asarray(box, dtype=np.float64).copy()
    for axis, flipped in enumerate(flip):
        if flipped:
            corners[:, axis] = shape[perm[axis]] - 1 - corners[::-1, axis]
    out = np.empty_like(corners)
    out[:, list(perm)] = corners
    return out


def crop_box(box: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Float box (inclusive, any values) -> crop box ``(2, 3)`` int (half-open), rounded outwards and clipped to
    ``shape``; at least one voxel per axis even when the float box lies wholly outside the image."""
    box = np.asarray(box, dtype=np.float64)
    size = np.asarray(shape[:3], dtype=np.int64)
    lo = np.clip(np.floor(box[0]).astype(np.int64), 0, size - 1)
    hi = np.clip(np.ceil(box[1]).astype(np.int64) + 1, lo + 1, size)
    return np.stack([lo, hi])


def overlaps_image(box: np.ndarray, shape: tuple[int, ...]) -> bool:
    """True when a float box (inclusive, ``(2, 3)``) is finite, not inverted, and reaches into an image of ``shape``."""
    box = np.asarray(box, dtype=np.float64)
    size = np.asarray(shape[:3], dtype=np.float64)
    return bool(np.isfinite(box).all() and (box[1] >= box[0]).all() and (box[1] >= 0).all() and (box[0] <= size - 1).all())


def union_box(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Smallest crop box holding the crop boxes ``a`` and ``b``."""
    return np.stack([np.minimum(a[0], b[0]), np.maximum(a[1], b[1])])


def margin_voxels(margin_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """A margin in mm as whole voxels per axis ``(3,)`` (rounded up, so the margin is at least ``margin_mm``)."""
    return np.ceil(float(margin_mm) / np.asarray(spacing, dtype=np.float64) - 1e-9).astype(np.int64)


def grow_box(box: np.ndarray, voxels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Crop box grown by ``voxels`` ``(3,)`` on every side, clipped to ``shape``."""
    size = np.asarray(shape[:3], dtype=np.int64)
    return np.stack([np.maximum(box[0] - voxels, 0), np.minimum(box[1] + voxels, size)])


def mask_crop_box(mask: np.ndarray) -> np.ndarray | None:
    """Tight crop box of the True voxels of a 3D mask, or None for an empty mask."""
    hits = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(len(h) == 0 for h in hits):
        return None
    return np.array([[h[0] for h in hits], [h[-1] + 1 for h in hits]], dtype=np.int64)


def box_shape(box: np.ndarray) -> tuple[int, int, int]:
    """Voxels along x, y, z of a crop box."""
    return tuple(int(n) for n in np.asarray(box[1]) - np.asarray(box[0]))  # type: ignore[return-value]


def slices(box: np.ndarray) -> tuple[slice, slice, slice]:
    """The array slices ``[x, y, z]`` of a crop box."""
    return tuple(slice(int(a), int(b)) for a, b in zip(box[0], box[1]))  # type: ignore[return-value]


def crop(volume: Volume, box: np.ndarray) -> Volume:
    """The part of ``volume`` (``(X, Y, Z[, C])``) inside a crop box, on the same grid: same spacing and direction,
    origin at the physical position of voxel ``box[0]``. No resampling."""
    origin = tuple(float(v) for v in volume.index_to_physical(np.asarray(box[0], dtype=np.float64)))
    return Volume(np.ascontiguousarray(volume.array[slices(box)]), volume.spacing, origin, np.array(volume.direction))


def paste(array: np.ndarray, box: np.ndarray, shape: tuple[int, int, int], fill: float = 0) -> np.ndarray:
    """Put a cropped array ``(x, y, z[, C])`` back at its crop box into a new array of spatial ``shape``, ``fill``
    elsewhere (the inverse of :func:`crop` inside the box)."""
    if tuple(array.shape[:3]) != box_shape(box):
        raise ValueError(f"array of shape {array.shape[:3]} does not fit crop box of shape {box_shape(box)}")
    out = np.full(tuple(shape[:3]) + tuple(array.shape[3:]), fill, dtype=array.dtype)
    out[slices(box)] = array
    return out


def box_corners_mm(volume: Volume, box: np.ndarray) -> dict:
    """Physical extent of a crop box: the centres of its first and last voxel in mm (LPS), and their min/max."""
    corners = volume.index_to_physical(np.stack([box[0], np.asarray(box[1]) - 1]).astype(np.float64))
    return {"lo_corner_mm": corners[0].round(3).tolist(), "hi_corner_mm": corners[1].round(3).tolist(),
            "min_mm": corners.min(0).round(3).tolist(), "max_mm": corners.max(0).round(3).tolist()}


def fraction_inside(mask: np.ndarray, box: np.ndarray) -> float | None:
    """Fraction of the True voxels of ``mask`` ``(X, Y, Z)`` inside a crop box; None for an empty mask."""
    total = int(np.count_nonzero(mask))
    return float(np.count_nonzero(mask[slices(box)]) / total) if total else None


def grow_to_contain(box: np.ndarray, mask: np.ndarray, margin_mm: float, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """A training case's crop box: ``box`` grown so that it holds every True voxel of ``mask`` plus ``margin_mm``
    (clipped to the image), so the network never learns a cut organ. Returns ``(box, grown_mm)`` with
    ``grown_mm`` ``(2, 3)``: how far the low and high faces moved outwards along x, y, z, in mm (0 where the box
    already held the mask)."""
    tight = mask_crop_box(mask)
    if tight is None:
        return box.copy(), np.zeros((2, 3))
    needed = grow_box(tight, margin_voxels(margin_mm, spacing), mask.shape)
    grown = union_box(box, needed)
    moved = np.stack([box[0] - grown[0], grown[1] - box[1]]).astype(np.float64)
    return grown, moved * np.asarray(spacing, dtype=np.float64)
