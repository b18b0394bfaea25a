"""Few-shot organ boxes as in the paper: edge-point queries from k labeled shots, retrieved on a test map, the
per-shot boxes combined, then enlarged by a recall-calibrated alpha (leave-one-shot-out on the shots).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nnunet_ape.localize.boxes import alpha_for_recall, edge_points, points_box
from nnunet_ape.localize.retrieval import nearest_voxels

COMBINE = ("mean", "median")
DEFAULT_ALPHA = 1.5  # used when a single shot leaves nothing to calibrate on


@dataclass
class OrganQueries:
    """One organ's queries: ``edges[s]`` are the embeddings ``(6, C)`` of the 6 edge points of shot ``s``."""

    edges: list[np.ndarray] = field(default_factory=list)
    alpha: float = DEFAULT_ALPHA


def shot_queries(embedding: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Embeddings ``(6, C)`` of the 6 edge points of ``mask`` ``(X, Y, Z)`` on the map ``(X, Y, Z, C)``."""
    points = edge_points(mask)
    return embedding[points[:, 0], points[:, 1], points[:, 2]].astype(np.float64)


def combine_boxes(boxes: list[np.ndarray], how: str = "mean") -> np.ndarray:
    """Combine per-shot boxes ``(2, 3)``: the paper averages corners; ``median`` ignores a stray shot."""
    if how not in COMBINE:
        raise ValueError(f"unknown combination {how!r}; choose one of {COMBINE}")
    stack = np.stack(boxes)
    return stack.mean(0) if how == "mean" else np.median(stack, axis=0)


def predict_box(edges: list[np.ndarray], embedding: np.ndarray, how: str = "mean") -> tuple[np.ndarray, list[np.ndarray]]:
    """Box ``(2, 3)`` on a test map ``(X, Y, Z, C)`` from the shots' edge queries, and the per-shot boxes.

    All queries are retrieved in one pass over the map.
    """
    found = nearest_voxels(np.concatenate(edges), embedding)
    per_shot = [points_box(found[i * 6 : (i + 1) * 6]) for i in range(len(edges))]
    return combine_boxes(per_shot, how), per_shot


def calibrate_alpha(
    edges: list[np.ndarray], maps: list[np.ndarray], masks: list[np.ndarray], target: float = 0.99, how: str = "mean",
) -> float:
    """Leave-one-shot-out enlargement: for each shot, predict its box from the other shots and find the alpha that
    reaches ``target`` recall of its mask; return the largest (so every shot reaches the target). With a single
    shot there is nothing to hold out and :data:`DEFAULT_ALPHA` is returned."""
    if len(edges) < 2:
        return DEFAULT_ALPHA
    alphas = []
    for held in range(len(edges)):
        others = [e for i, e in enumerate(edges) if i != held]
        box, _ = predict_box(others, maps[held], how)
        alphas.append(alpha_for_recall(masks[held], box, target))
    return float(max(alphas))

