"""Landmark retrieval: the voxel of a test map whose embedding is nearest (Euclidean) to each query."""

from __future__ import annotations

import numpy as np
import torch

from nnunet_ape.io import Volume


BLOCK = 8  # voxels per block side for the bounds of the pruned search


@torch.no_grad()
def nearest_voxels(queries: np.ndarray, embedding: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Exact nearest-embedding search.

    queries: ``(Q, C)`` embeddings; embedding: map ``(X, Y, Z, C)``. Returns voxel indices ``(Q, 3)`` (x, y, z)
    of the voxel whose embedding is nearest to each query.

    Branch and bound, exact because the bounds are: the map is cut into blocks of ``block``^3 voxels and the
    bounding box (in embedding space) of each block's values is kept. For a query, no voxel of a block can be
    nearer than the distance to the block's box (lower bound); the nearest voxel of the few blocks with the
    smallest lower bounds gives an upper bound; only blocks whose lower bound does not exceed it are searched
    voxel by voxel. APE maps are smooth, so few blocks remain.

    Voxels with a non-finite embedding (:func:`outside_to_inf`: outside the search region) are never returned, and
    blocks holding only such voxels are not searched. ValueError when no voxel is finite.
    """
    shape = embedding.shape[:3]
    channels = embedding.shape[-1]
    pad = [(0, (-n) % block) for n in shape] + [(0, 0)]
    # edge padding repeats real values: boxes stay the same, and a padding voxel found nearest is replaced by its
    # real twin (clamping the index), which has the same embedding
    padded = torch.from_numpy(np.pad(np.asarray(embedding, dtype=np.float32), pad, mode="edge"))
    nb = [n // block for n in padded.shape[:3]]
    blocks = (
        padded.view(nb[0], block, nb[1], block, nb[2], block, channels)
        .permute(0, 2, 4, 1, 3, 5, 6)
        .reshape(-1, block**3, channels)
    )
    del padded
    finite = torch.isfinite(blocks).all(2)  # (B, block^3)
    searchable = torch.nonzero(finite.any(1)).squeeze(1)  # block numbers with a voxel to find
    if len(searchable) == 0:
        raise ValueError("the map has no finite embedding to search")
    if len(searchable) < len(blocks):
        blocks, finite = blocks[searchable], finite[searchable]
    inf = torch.tensor(float("inf"))
    low = torch.where(finite[..., None], blocks, inf).amin(1)  # (B, C) box of each block's searchable values
    high = torch.where(finite[..., None], blocks, -inf).amax(1)
    found = np.zeros((len(queries), 3), dtype=np.int64)
    for i, q in enumerate(torch.as_tensor(np.asarray(queries), dtype=torch.float32)):
        nearest_in_box = torch.maximum(torch.minimum(q, high), low)
        lower = (nearest_in_box - q).pow(2).sum(1)
        # upper bound: the exact nearest voxel of the most promising blocks (tighter than any box corner)
        seeds = torch.topk(lower, min(4, len(lower)), largest=False).indices
        upper = (blocks[seeds] - q).pow(2).sum(2).min()
        candidates = torch.nonzero(lower <= upper).squeeze(1)
        distances = (blocks[candidates] - q).pow(2).sum(2)  # (K, block^3)
        flat = int(torch.argmin(distances))
        b, offset = int(searchable[candidates[flat // block**3]]), flat % block**3
        bx, by, bz = np.unravel_index(b, nb)
        ox, oy, oz = np.unravel_index(offset, (block, block, block))
        found[i] = (bx * block + ox, by * block + oy, bz * block + oz)
    return np.minimum(found, np.asarray(shape) - 1)



def outside_to_inf(embedding: np.ndarray, region: np.ndarray) -> np.ndarray:
    """A copy of the map ``(X, Y, Z, C)`` with +inf at the voxels outside ``region`` (bool ``(X, Y, Z)``): no
    query matches them (:func:`nearest_voxels`), and label transfer treats them as background."""
    out = np.array(embedding, copy=True)
    out[~np.asarray(region, dtype=bool)] = np.inf
    return out


def retrieve(queries: np.ndarray, embedding: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Nearest voxels of ``queries`` ``(Q, C)`` in a map Volume ``(X, Y, Z, C)``: (indices ``(Q, 3)``, mm ``(Q, 3)``)."""
    index = nearest_voxels(queries, embedding.array)
    return index, embedding.index_to_physical(index)


def radial_errors(predicted_mm: np.ndarray, true_mm: np.ndarray) -> np.ndarray:
    """Euclidean distances (mm) between predicted and true points, ``(Q, 3)`` each -> ``(Q,)``."""
    return np.linalg.norm(np.asarray(predicted_mm) - np.asarray(true_mm), axis=-1)
