"""Few-shot organ z-ranges from BPR slice scores.

Each shot gives the score interval its organ occupies (cleaned score at the organ's lowest and highest slice);
the intervals of k shots are combined (mean or median of the two ends); on a test CT the organ's z-range is the
slices whose cleaned score lies in the interval widened by a margin (score units) calibrated leave-one-shot-out
for a target recall of the organ's voxels. All indices are canonical (LPS, slice 0 at the feet).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nnunet_ape.bpr.scoring import clean_slice_scores, fitted_slope, score_at
from nnunet_ape.canonical import CanonicalCT, canonical_ct
from nnunet_ape.io import Volume
from nnunet_ape.localize.fewshot import COMBINE, combine_values

DEFAULT_MARGIN_MM = 20.0  # single shot: nothing to calibrate on; TotalSegmentator's ROI margin, in score units via the shot's slope


@dataclass(eq=False)
class ScoredCT:
    """Cleaned slice scores ``(Z,)`` of a canonical CT and their slope per mm."""

    scores: np.ndarray
    slope: float


def score_ct(model, canon: Volume | CanonicalCT, device: str = "cpu") -> ScoredCT:
    """Cleaned (smoothed, body-only) raw scores of a CT, canonical or a :class:`~nnunet_ape.canonical.CanonicalCT`;
    see :mod:`nnunet_ape.bpr.scoring`."""
    ct = canonical_ct(canon)
    scores = clean_slice_scores(model, ct, device)[2]
    return ScoredCT(scores, fitted_slope(scores, np.arange(len(scores)) * ct.canon.spacing[2]))


def organ_interval(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Score interval ``[low, high]`` of an organ: scores at the lowest and highest slice of ``mask`` ``(X, Y, Z)``
    that have a score. Slices without body have none (NaN), and an organ can reach onto them (a spinal cord down to
    a scan's last slice); NaN twice when none of the organ's slices has a score."""
    slices = np.flatnonzero(mask.any(axis=(0, 1)))
    slices = slices[np.isfinite(scores[slices])]
    if slices.size == 0:
        return np.array([np.nan, np.nan])
    return np.asarray(sorted([score_at(scores, slices[0]), score_at(scores, slices[-1])]))


def combine_intervals(intervals: list[np.ndarray], how: str = "mean") -> np.ndarray:
    """Combine the shots' intervals ``(2,)`` end by end (:func:`~nnunet_ape.localize.fewshot.combine_values`: mean as
    the paper does for boxes, median or trimmed), over the shots whose interval is finite (:func:`organ_interval`);
    NaN twice when none is."""
    if how not in COMBINE:
        raise ValueError(f"unknown combination {how!r}; choose one of {COMBINE}")
    stack = np.stack(intervals)
    stack = stack[np.isfinite(stack).all(axis=1)]
    if len(stack) == 0:
        return np.array([np.nan, np.nan])
    return combine_values(stack, how)


def in_range(scores: np.ndarray, interval: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Per slice ``(Z,)`` bool: its score lies in ``interval`` widened by ``margin`` (False for NaN scores)."""
    return (scores >= interval[0] - margin) & (scores <= interval[1] + margin)


def z_range(scores: np.ndarray, interval: np.ndarray, margin: float = 0.0) -> tuple[int, int]:
    """First and last slice whose score lies in ``interval`` widened by ``margin``; when none does, the one slice
    closest to the interval (a z-range never comes back empty). A NaN interval (no shot's organ had a score) places
    nothing: the whole scan, never a cut."""
    if not np.all(np.isfinite(interval)):
        return 0, len(scores) - 1
    inside = np.flatnonzero(in_range(scores, interval, margin))
    if inside.size:
        return int(inside[0]), int(inside[-1])
    distance = np.where(np.isfinite(scores), np.minimum(np.abs(scores - interval[0]), np.abs(scores - interval[1])), np.inf)
    nearest = int(np.argmin(distance))
    return nearest, nearest


def z_recall(mask: np.ndarray, low: int, high: int) -> float:
    """Fraction of the voxels of ``mask`` ``(X, Y, Z)`` on slices ``low..high``."""
    per_slice = mask.sum(axis=(0, 1))
    total = per_slice.sum()
    return float(per_slice[low : high + 1].sum() / total) if total else 1.0


def margin_for_recall(mask: np.ndarray, scores: np.ndarray, interval: np.ndarray, target: float = 0.99) -> float:
    """Smallest margin (score units, to 0.1 % of the score range) whose z-range keeps ``target`` of ``mask``."""
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        return 0.0
    low, high = 0.0, float(finite.max() - finite.min() + abs(interval[1] - interval[0])) + 1.0
    if z_recall(mask, *z_range(scores, interval, 0.0)) >= target:
        return 0.0
    while high - low > 1e-3 * max(high, 1e-6):
        middle = (low + high) / 2
        if z_recall(mask, *z_range(scores, interval, middle)) >= target:
            high = middle
        else:
            low = middle
    return high


def calibrate_margin(intervals: list[np.ndarray], scored: list[ScoredCT], masks: list[np.ndarray], target: float = 0.99,
                     how: str = "mean") -> float:
    """Leave-one-shot-out margin: the largest over shots of the margin that the other shots' interval needs to keep
    ``target`` of the held-out shot's organ. One shot: :data:`DEFAULT_MARGIN_MM` times the shot's score slope."""
    if len(intervals) < 2:
        slope = abs(scored[0].slope) if np.isfinite(scored[0].slope) else 0.0
        return DEFAULT_MARGIN_MM * slope
    margins = []
    for held in range(len(intervals)):
        others = combine_intervals([iv for i, iv in enumerate(intervals) if i != held], how)
        margins.append(margin_for_recall(masks[held], scored[held].scores, others, target))
    return float(max(margins))


def z_box(shape: tuple[int, int, int], low: int, high: int) -> np.ndarray:
    """Canonical box ``(2, 3)`` spanning the full x/y extent of ``shape`` and slices ``low..high``."""
    return np.array([[0.0, 0.0, low], [shape[0] - 1.0, shape[1] - 1.0, high]])
