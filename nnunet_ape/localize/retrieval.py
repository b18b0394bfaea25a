"""Landmark retrieval: the voxel of a test map whose embedding is nearest (Euclidean) to each query."""

from __future__ import annotations

import numpy as np
import torch

from nnunet_ape.io import Volume


@torch.no_grad()
def nearest_voxels(queries: np.ndarray, embedding: np.ndarray, chunk: int = 1 << 21) -> np.ndarray:
    """Exact nearest-embedding search.

    queries: ``(Q, C)`` embeddings; embedding: map ``(X, Y, Z, C)``. Returns voxel indices ``(Q, 3)`` (x, y, z)
    of the voxel whose embedding is nearest to each query (ties: the first in memory order). The map is scanned in
    chunks of ``chunk`` voxels with one matrix product each (``|m|^2 - 2 m.q``), so memory stays
    ``chunk * Q`` floats whatever the map size.
    """
    shape = embedding.shape[:3]
    flat = torch.from_numpy(np.ascontiguousarray(embedding).reshape(-1, embedding.shape[-1]))
    q = torch.as_tensor(np.asarray(queries), dtype=torch.float32)
    best = torch.full((len(q),), float("inf"))
    best_index = torch.zeros(len(q), dtype=torch.long)
    for start in range(0, len(flat), chunk):
        block = flat[start : start + chunk].float()
        # |m - q|^2 without |q|^2, which is the same for every voxel of a query
        score = (block * block).sum(1, keepdim=True) - 2.0 * block @ q.T
        value, index = score.min(0)
        better = value < best
        best = torch.where(better, value, best)
        best_index = torch.where(better, index + start, best_index)
    return np.stack(np.unravel_index(best_index.numpy(), shape), axis=1)


def retrieve(queries: np.ndarray, embedding: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Nearest voxels of ``queries`` ``(Q, C)`` in a map Volume ``(X, Y, Z, C)``: (indices ``(Q, 3)``, mm ``(Q, 3)``)."""
    index = nearest_voxels(queries, embedding.array)
    return index, embedding.index_to_physical(index)


def radial_errors(predicted_mm: np.ndarray, true_mm: np.ndarray) -> np.ndarray:
    """Euclidean distances (mm) between predicted and true points, ``(Q, 3)`` each -> ``(Q,)``."""
    return np.linalg.norm(np.asarray(predicted_mm) - np.asarray(true_mm), axis=-1)
