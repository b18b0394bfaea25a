"""Axis-aligned boxes in voxel indices and the paper's box metrics (IoU, recall, enlargement, volume ratio).

A box is a float array ``(2, 3)``: row 0 the lowest, row 1 the highest voxel index included, along x, y, z
(index order of :class:`nnunet_ape.io.Volume`). Float so that averaged and enlarged boxes need no rounding;
:func:`box_slices` rounds outwards when a box is used to crop.
"""

from __future__ import annotations

import numpy as np


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight box ``(2, 3)`` of the True voxels of a 3D mask. Raises ValueError for an empty mask."""
    index = np.argwhere(mask)
    if len(index) == 0:
        raise ValueError("mask is empty")
    return np.stack([index.min(0), index.max(0)]).astype(np.float64)


def edge_points(mask: np.ndarray) -> np.ndarray:
    """The paper's 6 edge points ``(6, 3)`` (voxel indices) of a mask: for each axis, a mask voxel with the lowest
    and one with the highest index along it (x-min, x-max, y-min, y-max, z-min, z-max). Where several voxels share
    the extreme, the one closest to their centroid is taken, so the point lies inside the face."""
    index = np.argwhere(mask)
    if len(index) == 0:
        raise ValueError("mask is empty")
    points = []
    for axis in range(3):
        for extreme in (index[:, axis].min(), index[:, axis].max()):
            face = index[index[:, axis] == extreme]
            centre = face.mean(0)
            points.append(face[np.argmin(((face - centre) ** 2).sum(1))])
    return np.array(points, dtype=np.int64)


def points_box(points: np.ndarray) -> np.ndarray:
    """Bounding box ``(2, 3)`` of voxel points ``(P, 3)``."""
    points = np.asarray(points, dtype=np.float64)
    return np.stack([points.min(0), points.max(0)])


def box_volume(box: np.ndarray) -> float:
    """Number of voxels covered by a box (side = hi - lo + 1; 0 for an empty box)."""
    return float(np.prod(np.clip(box[1] - box[0] + 1, 0, None)))


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Number of voxels two boxes share."""
    return box_volume(np.stack([np.maximum(a[0], b[0]), np.minimum(a[1], b[1])]))


def box_inside_fraction(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of box ``a``'s voxels that box ``b`` covers (1 when ``a`` lies inside ``b``; 0 for an empty ``a``)."""
    own = box_volume(a)
    return _overlap(a, b) / own if own > 0 else 0.0


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boxes, counting voxels (boxes are inclusive)."""
    overlap = _overlap(a, b)
    union = box_volume(a) + box_volume(b) - overlap
    return overlap / union if union > 0 else 0.0


def clip_box(box: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Box clipped to an image of ``shape`` (voxel indices 0 .. n-1)."""
    high = np.asarray(shape[:3], dtype=np.float64) - 1
    return np.stack([np.clip(box[0], 0, high), np.clip(box[1], 0, high)])


MIN_HALF_EXTENT = 0.5  # voxels: a flat box (one slice thick, or a point) still grows when enlarged


def enlarge_box(box: np.ndarray, alpha: float, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Scale each side of a box by ``alpha`` about its centre (alpha = 1: unchanged); clipped when ``shape``
    is given. A side shorter than one voxel counts as one voxel (half-extent :data:`MIN_HALF_EXTENT`), so that a
    flat or collapsed box grows with alpha too."""
    centre = box.mean(0)
    half = np.maximum((box[1] - box[0]) / 2, MIN_HALF_EXTENT) * alpha
    out = np.stack([centre - half, centre + half])
    return clip_box(out, shape) if shape is not None else out


def covering_alpha(box: np.ndarray, shape: tuple[int, ...]) -> float:
    """The smallest ``alpha`` at which :func:`enlarge_box` covers the whole image of ``shape`` (at least 1)."""
    centre = box.mean(0)
    half = np.maximum((box[1] - box[0]) / 2, MIN_HALF_EXTENT)
    reach = np.maximum(centre, np.asarray(shape[:3], dtype=np.float64) - 1 - centre)
    return float(max(1.0, np.max(reach / half)))


def box_slices(box: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, slice, slice]:
    """Slices selecting the voxels of a box, rounded outwards and clipped to ``shape``."""
    lo = np.clip(np.floor(box[0]).astype(int), 0, None)
    hi = np.minimum(np.ceil(box[1]).astype(int) + 1, np.asarray(shape[:3]))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def box_recall(mask: np.ndarray, box: np.ndarray) -> float:
    """Fraction of the mask's voxels inside the box (box rounded outwards, like a crop)."""
    total = int(mask.sum())
    if total == 0:
        raise ValueError("mask is empty")
    return float(mask[box_slices(box, mask.shape)].sum()) / total


def volume_ratio(shape: tuple[int, ...], box: np.ndarray) -> float:
    """Raw image volume / cropped volume (the paper's VR) for a crop by ``box``."""
    crop = np.prod([s.stop - s.start for s in box_slices(box, shape)])
    return float(np.prod(shape[:3]) / max(crop, 1))


def alpha_for_recall(mask: np.ndarray, box: np.ndarray, target: float = 0.99, max_alpha: float | None = None) -> float:
    """Smallest enlargement ``alpha`` (to 0.01) with ``box_recall(mask, enlarge_box(box, alpha)) >= target``.

    Without ``max_alpha`` the search goes up to the alpha that covers the whole image (:func:`covering_alpha`), so
    a target is always reached: a box far off the organ gets the alpha of a crop that keeps nearly everything.
    With ``max_alpha``, that is returned when the target cannot be reached below it.
    """
    total = int(mask.sum())  # once: counting a full-size mask costs as much as the whole search
    if total == 0:
        raise ValueError("mask is empty")
    recall = lambda a: float(mask[box_slices(enlarge_box(box, a, mask.shape), mask.shape)].sum()) / total  # noqa: E731
    return smallest_reaching(recall, 0.0, covering_alpha(box, mask.shape) if max_alpha is None else max_alpha, target)


def smallest_reaching(recall, low: float, high: float, target: float) -> float:
    """Bisection for the smallest growth ``x`` in ``[low, high]`` (to 0.01, rounded up) with ``recall(x) >=
    target``, ``recall`` growing with ``x``; ``high`` itself when even it misses the target."""
    if recall(high) < target:
        return high
    while high - low > 0.005:
        mid = (low + high) / 2
        if recall(mid) >= target:
            high = mid
        else:
            low = mid
    return float(np.ceil(high * 100) / 100)


def shot_alphas(boxes: list[np.ndarray], masks: list, target: float) -> list[float]:
    """Per shot, the alpha its held-out box ``(2, 3)`` needs to reach ``target`` recall of its mask
    (:func:`alpha_for_recall`). A mask needs only ``shape`` and indexing by a box (a CroppedMask will do)."""
    return [alpha_for_recall(mask, box, target) for box, mask in zip(boxes, masks)]


COVERAGE = 0.99  # share of new cases that should need no more enlargement than the calibrated one


def calibrated_alpha(alphas: list[float], default: float, coverage: float = COVERAGE) -> tuple[float, float | None]:
    """The enlargement to store from the shots' held-out ``alphas`` (:func:`shot_alphas`), and the coverage it
    gives: the ceil((n + 1) * coverage)-th smallest of the n alphas, or the largest when that rank exceeds n. A new
    case exchangeable with the shots then needs no more with probability at least rank / (n + 1) (split-conformal
    reasoning): the returned coverage, ``coverage`` itself from 99 shots on (at 0.99), n / (n + 1) below (5 shots:
    0.83; the largest of n misses a new case about once in n + 1). ``(default, None)`` without alphas."""
    if not alphas:
        return float(default), None
    ordered = np.sort(np.asarray(alphas, dtype=np.float64))
    n = len(ordered)
    rank = min(int(np.ceil((n + 1) * coverage - 1e-9)), n)
    return float(ordered[rank - 1]), rank / (n + 1)


def alpha_over_shots(boxes: list[np.ndarray], masks: list, target: float, default: float) -> float:
    """Leave-one-shot-out enlargement: the smallest alpha that brings every held-out box ``(2, 3)`` to ``target``
    recall of its shot's mask (the largest of :func:`shot_alphas`); ``default`` when there are no held-out boxes
    (one shot)."""
    return float(max(shot_alphas(boxes, masks, target), default=default))
