"""Few-shot organ boxes as in the paper: edge-point queries from k labeled shots, retrieved on a test map, the
per-shot boxes combined, then enlarged by a recall-calibrated alpha (leave-one-shot-out on the shots).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import trim_mean

from nnunet_ape.localize.boxes import alpha_over_shots, edge_points, mask_box, points_box
from nnunet_ape.localize.retrieval import nearest_voxels

COMBINE = ("mean", "median", "trimmed")
DEFAULT_COMBINE = "trimmed"  # 5 head-and-neck shots: IoU 0.421 vs the mean's 0.410; with 163 shots no change (docs/benchmarks.md)
TRIM = 0.2  # "trimmed": the share of shots left out at each end, per box side (1 of 5 shots, none of 2)
DEFAULT_ALPHA = 1.5  # used when a single shot leaves nothing to calibrate on


@dataclass
class OrganQueries:
    """One organ's queries: ``edges[s]`` are the embeddings ``(6, C)`` of the 6 edge points of shot ``s``."""

    edges: list[np.ndarray] = field(default_factory=list)
    alpha: float = DEFAULT_ALPHA


def shot_queries(embedding: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Embeddings ``(6, C)`` of the 6 edge points of ``mask`` ``(X, Y, Z)`` on the map ``(X, Y, Z, C)``."""
    return point_queries(embedding, edge_points(mask), mask)


def point_queries(embedding: np.ndarray, points: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Embeddings ``(P, C)`` float64 of voxel ``points`` ``(P, 3)`` of an organ ``mask`` ``(X, Y, Z)`` on the map
    ``(X, Y, Z, C)``. A point whose embedding is not finite (outside the search region,
    :func:`~nnunet_ape.localize.retrieval.outside_to_inf`) takes that of the nearest organ voxel that has one,
    else of the nearest voxel that has one."""
    points = np.asarray(points, dtype=np.int64)
    values = np.asarray(embedding[points[:, 0], points[:, 1], points[:, 2]], dtype=np.float64)
    bad = ~np.isfinite(values).all(1)
    if bad.any():
        for pool in (np.asarray(mask, dtype=bool), np.ones(mask.shape, dtype=bool)):
            candidates = np.argwhere(pool & np.isfinite(embedding).all(-1))
            if len(candidates):
                break
        else:
            raise ValueError("the map has no finite embedding")
        for i in np.flatnonzero(bad):
            nearest = candidates[np.argmin(((candidates - points[i]) ** 2).sum(1))]
            values[i] = embedding[tuple(nearest)]
    return values


def combine_values(stack: np.ndarray, how: str = "mean") -> np.ndarray:
    """Combine the shots' values ``(S, ...)`` over axis 0: ``mean`` (the paper), ``median`` (ignores stray shots),
    or ``trimmed`` (the mean without the :data:`TRIM` lowest and highest shots, per value; below 5 shots that leaves
    none out and is the mean)."""
    if how not in COMBINE:
        raise ValueError(f"unknown combination {how!r}; choose one of {COMBINE}")
    stack = np.asarray(stack, dtype=np.float64)
    if how == "mean" or how == "trimmed" and int(TRIM * len(stack)) == 0:  # bit-identical to the mean when none is cut
        return stack.mean(0)
    if how == "median":
        return np.median(stack, axis=0)
    return trim_mean(stack, TRIM, axis=0)


def combine_boxes(boxes: list[np.ndarray], how: str = "mean") -> np.ndarray:
    """Combine per-shot boxes ``(2, 3)`` corner by corner (:func:`combine_values`)."""
    return combine_values(np.stack(boxes), how)


def cut_sides(mask: np.ndarray) -> np.ndarray:
    """Which sides of a mask's box ``(X, Y, Z)`` touch the image border: bool ``(2, 3)``, row 0 the low sides
    (index 0), row 1 the high sides, columns x, y, z. There the scan cut the organ: that edge is not anatomy."""
    box = mask_box(mask)
    return np.stack([box[0] <= 0, box[1] >= np.asarray(mask.shape) - 1])


def predict_box(
    edges: list[np.ndarray], embedding: np.ndarray, how: str = "mean", cuts: list[np.ndarray] | None = None,
    found: np.ndarray | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Box ``(2, 3)`` on a test map ``(X, Y, Z, C)`` from the shots' edge queries, and the per-shot boxes.

    ``cuts``: per shot, :func:`cut_sides` of its mask, in the same index space as the map (edge points in the order
    of :func:`~nnunet_ape.localize.boxes.edge_points`). An edge the scan cut is no landmark: its retrieved point is
    ignored, and that side of the box comes from the shots that show it, or reaches the test image's border when
    none does (the organ goes on beyond every shot's field of view). Where sides from different shots cross, that
    axis comes from the shots' whole boxes. All queries are retrieved in one pass; ``found``: their voxels
    ``(6 * shots, 3)`` when the caller retrieved them already.
    """
    cuts = cuts if cuts is not None else [np.zeros((2, 3), bool)] * len(edges)
    border = np.stack([np.zeros(3), np.asarray(embedding.shape[:3], dtype=np.float64) - 1])
    found = nearest_voxels(np.concatenate(edges), embedding) if found is None else found
    sides = []  # per shot, its box with NaN on the sides it cannot tell
    for i, cut in enumerate(cuts):
        point_cut = cut.T.ravel()  # edge point j lies on side j % 2 of axis j // 2
        kept = found[i * 6 : (i + 1) * 6][~point_cut]
        box = points_box(kept) if len(kept) else np.full((2, 3), np.nan)
        sides.append(np.where(cut, np.nan, box))
    per_shot = [np.where(np.isnan(b), border, b) for b in sides]
    box = _combine_sides(sides, how)
    box = np.where(np.isnan(box), border, box)
    # a side known to one shot only and the opposite side known to another only can cross (lo > hi): on such an
    # axis, combine the shots' whole boxes instead (each has lo <= hi, so their mean or median does too)
    crossed = box[0] > box[1]
    if crossed.any():
        box[:, crossed] = combine_boxes(per_shot, how)[:, crossed]
    return box, per_shot


def _combine_sides(boxes: list[np.ndarray], how: str) -> np.ndarray:
    """Per side, the combination (:func:`combine_values`) over the boxes that have it (NaN where none does)."""
    stack = np.stack(boxes)
    known = ~np.isnan(stack)
    if known.all():
        return combine_values(stack, how)
    out = np.full(stack.shape[1:], np.nan)
    for index in zip(*np.nonzero(known.any(0))):
        out[index] = combine_values(stack[(slice(None), *index)][known[(slice(None), *index)]], how)
    return out


def calibrate_alpha(
    edges: list[np.ndarray], maps: list[np.ndarray], masks: list[np.ndarray], target: float = 0.99, how: str = "mean",
    cuts: list[np.ndarray] | None = None,
) -> float:
    """Leave-one-shot-out enlargement: for each shot, predict its box from the other shots and find the alpha that
    reaches ``target`` recall of its mask; return the largest (so every shot reaches the target). With a single
    shot there is nothing to hold out and :data:`DEFAULT_ALPHA` is returned. ``cuts`` as in :func:`predict_box`;
    maps, masks and edge points must share one index space (canonical, when shots differ in orientation)."""
    held_out = [held_out_box(edges, maps[held], held, how, cuts) for held in range(len(edges))] if len(edges) > 1 else []
    return alpha_over_shots(held_out, masks, target, DEFAULT_ALPHA)


def held_out_box(
    edges: list[np.ndarray], embedding: np.ndarray, held: int, how: str = "mean", cuts: list[np.ndarray] | None = None,
) -> np.ndarray:
    """Box ``(2, 3)`` on shot ``held``'s own map ``(X, Y, Z, C)`` from the other shots' edge queries (and cut sides,
    as in :func:`predict_box`): the leave-one-shot-out prediction."""
    others = [i for i in range(len(edges)) if i != held]
    other_cuts = None if cuts is None else [cuts[i] for i in others]
    return predict_box([edges[i] for i in others], embedding, how, other_cuts)[0]
