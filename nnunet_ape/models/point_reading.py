"""Read a trilinearly upsampled map at a few points without computing the upsampled map.

Pretraining reads the APE map at about a thousand points of views of some 300k voxels. Upsampling the network's
stride-4 output to every voxel, then reading it at those points, spends most of a small network's step on voxels
nobody reads; :func:`read_upsampled_at` gives the same numbers from the stride-4 map directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _axis_taps(coords: torch.Tensor, size: int, coarse_size: int, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse indices and weights ``(B, k, 4)`` that give one axis of the reading at ``coords`` ``(B, k)``.

    The fine map is read linearly between its voxels ``floor(c)`` and ``floor(c) + 1`` (a voxel outside
    ``[0, size - 1]`` counts 0, as ``grid_sample``'s zero padding); each fine voxel ``o`` is itself the linear reading of
    the coarse map at ``max(0, (o + 0.5) / factor - 0.5)``, the last coarse voxel repeated past the end, as
    ``F.interpolate(mode="trilinear", align_corners=False)`` computes it.
    """
    low = torch.floor(coords)
    frac = coords - low
    indices, weights = [], []
    for fine, weight in ((low, 1.0 - frac), (low + 1.0, frac)):
        weight = torch.where((fine >= 0) & (fine <= size - 1), weight, torch.zeros_like(weight))
        source = ((fine.clamp(0, size - 1) + 0.5) / factor - 0.5).clamp_min(0.0)
        first = torch.floor(source).clamp_max(coarse_size - 1)
        lam = source - first
        second = torch.where(first < coarse_size - 1, first + 1.0, first)
        indices += [first, second]
        weights += [weight * (1.0 - lam), weight * lam]
    return torch.stack(indices, -1).long(), torch.stack(weights, -1)


def read_upsampled_at(coarse: torch.Tensor, points: torch.Tensor, factor: int, size: Sequence[int]) -> torch.Tensor:
    """Values of the upsampled map at continuous voxel indices, computed from the coarse map alone.

    coarse: ``(B, C, X', Y', Z')``; points: ``(B, k, 3)`` continuous voxel indices (x, y, z) in the fine grid;
    factor: the upsampling factor; size: the fine grid ``(X, Y, Z)`` (the upsampled map cropped to it).
    Returns ``(B, k, C)`` float32, equal up to rounding to reading
    ``F.interpolate(coarse, scale_factor=factor, mode="trilinear")[..., :X, :Y, :Z]`` trilinearly at ``points``
    (:func:`nnunet_ape.pretrain.loss.sample_embeddings`), gradients included.
    """
    coarse = coarse.float()
    batch, channels = coarse.shape[:2]
    k = points.shape[1]
    (ix, wx), (iy, wy), (iz, wz) = (
        _axis_taps(points[..., axis].float(), size[axis], coarse.shape[2 + axis], factor) for axis in range(3)
    )
    ny, nz = coarse.shape[3], coarse.shape[4]
    flat = (ix[..., :, None, None] * ny + iy[..., None, :, None]) * nz + iz[..., None, None, :]  # (B, k, 4, 4, 4)
    weight = wx[..., :, None, None] * wy[..., None, :, None] * wz[..., None, None, :]
    flat = flat.reshape(batch, 1, k * 64).expand(batch, channels, k * 64)
    values = coarse.reshape(batch, channels, -1).gather(2, flat).reshape(batch, channels, k, 64)
    return (values * weight.reshape(batch, 1, k, 64)).sum(-1).transpose(1, 2)
