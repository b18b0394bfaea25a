"""Separable (tri)linear resampling onto axis-aligned grids, memory-light for whole CT volumes."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def lerp_axis(x: torch.Tensor, coords: torch.Tensor, dim: int, fill: float | None = None) -> torch.Tensor:
    """Linearly interpolate ``x`` along ``dim`` at continuous indices ``coords`` (1D, in voxels of ``x``).

    Output has ``len(coords)`` entries along ``dim``. Coordinates outside ``[0, n-1]`` take the edge value,
    or ``fill`` when given.
    """
    n = x.shape[dim]
    coords = coords.to(device=x.device, dtype=torch.float32)
    clamped = coords.clamp(0, n - 1)
    lo = clamped.floor().long().clamp(max=max(n - 2, 0))
    hi = (lo + 1).clamp(max=n - 1)
    weight = (clamped - lo.float()).to(x.dtype)
    shape = [1] * x.ndim
    shape[dim] = -1
    out = torch.lerp(x.index_select(dim, lo), x.index_select(dim, hi), weight.view(shape))  # one fused pass
    if fill is not None:
        outside = ((coords < -1e-4) | (coords > n - 1 + 1e-4)).view(shape)
        out = out.masked_fill(outside, fill)
    return out


def resample_grid(
    x: torch.Tensor, coords: Sequence[torch.Tensor], fill: float | None = None
) -> torch.Tensor:
    """Trilinear resampling of the last three axes of ``x`` (``(..., X, Y, Z)``) at the tensor-product grid
    ``coords = (cx, cy, cz)`` of continuous source indices. Returns ``(..., len(cx), len(cy), len(cz))``.
    """
    for axis, c in enumerate(coords):
        x = lerp_axis(x, c, x.ndim - 3 + axis, fill)
    return x


def axis_coords(n_out: int, start: float, step: float) -> torch.Tensor:
    """Source indices ``start + step * j`` for ``j = 0..n_out-1`` (float32, 1D)."""
    return start + step * torch.arange(n_out, dtype=torch.float32)


def resample_spacing(
    x: torch.Tensor, spacing: Sequence[float], new_spacing: Sequence[float]
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Resample ``(..., X, Y, Z)`` from ``spacing`` to ``new_spacing`` (mm), keeping voxel 0 in place.

    The new grid covers the old extent: ``n_new = floor((n - 1) * s / s_new) + 1``. Returns the
    resampled tensor and its spatial shape.
    """
    coords = []
    for n, s, s_new in zip(x.shape[-3:], spacing, new_spacing):
        n_new = int((n - 1) * s / s_new + 1e-6) + 1
        coords.append(axis_coords(n_new, 0.0, s_new / s))
    out = resample_grid(x, coords)
    return out, tuple(out.shape[-3:])  # type: ignore[return-value]
