"""How well an APE map encodes position: R^2 of a linear fit from embedding to physical position."""

from __future__ import annotations

import numpy as np

from nnunet_ape.io import Volume


def position_r2(embedding: Volume, mask: np.ndarray | None = None, max_points: int = 50_000, seed: int = 0) -> float:
    """R^2 (pooled over x, y, z) of the least-squares affine map embedding -> physical position in mm.

    embedding: Volume with array ``(X, Y, Z, C)``; mask: boolean ``(X, Y, Z)`` of voxels to use (e.g. the body),
    all voxels when None. 1 means position is an exact affine function of the embedding, 0 means no information.
    """
    shape = embedding.shape
    index = np.argwhere(mask) if mask is not None else np.indices(shape).reshape(3, -1).T
    if len(index) == 0:
        raise ValueError("position_r2: the mask selects no voxel")
    rng = np.random.default_rng(seed)
    if len(index) > max_points:
        index = index[rng.choice(len(index), max_points, replace=False)]
    features = embedding.array[index[:, 0], index[:, 1], index[:, 2]].astype(np.float64)
    design = np.concatenate([features, np.ones((len(features), 1))], axis=1)
    positions = embedding.index_to_physical(index)
    coefficients, *_ = np.linalg.lstsq(design, positions, rcond=None)
    residual = positions - design @ coefficients
    total = positions - positions.mean(0)
    return float(1.0 - (residual**2).sum() / (total**2).sum())
