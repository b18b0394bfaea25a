"""Axial slices as BPR inputs, as the reference implementation prepares them: in-plane spacing 3.5 mm,
128 x 128 pixels centred on the image, HU clipped to [-1000, 1500]; and sampling of m equidistant slices."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from nnunet_ape.io import Volume, to_canonical
from nnunet_ape.resample import axis_coords, resample_grid

SLICE_MM = 3.5
SLICE_SIZE = 128
SLICE_HU = (-1000.0, 1500.0)


def normalize_slice_hu(hu: torch.Tensor, window: tuple[float, float] = SLICE_HU) -> torch.Tensor:
    """HU -> [-1, 1] after clipping to ``window``."""
    low, high = window
    return (hu.float().clamp(low, high) - low) / (high - low) * 2.0 - 1.0


def axial_slices(
    volume: Volume, z_indices: Sequence[int], pixel_mm: float = SLICE_MM, size: int = SLICE_SIZE
) -> torch.Tensor:
    """BPR inputs ``(len(z_indices), 1, size, size)`` for canonical axial slices ``z_indices`` of a CT.

    The CT is brought to canonical (LPS) order first, so ``z_indices`` count from the feet; each slice is
    resampled to ``pixel_mm`` in plane on a ``size`` x ``size`` grid centred on the image centre (air outside).
    Rows run along x (patient right to left), columns along y (anterior to posterior).
    """
    canon, _ = to_canonical(volume)
    coords = []
    for n, spacing in zip(canon.shape[:2], canon.spacing[:2]):
        step = pixel_mm / spacing
        start = (n - 1) / 2 - step * (size - 1) / 2
        coords.append(axis_coords(size, start, step))
    z = torch.as_tensor(list(z_indices), dtype=torch.float32)
    hu = torch.from_numpy(np.asarray(canon.array, dtype=np.float32))
    grid = resample_grid(hu, (coords[0], coords[1], z), fill=SLICE_HU[0])  # (size, size, len(z))
    return normalize_slice_hu(grid.permute(2, 0, 1))[:, None]


def sample_equidistant(rng: np.random.Generator, n_slices: int, m: int = 8, min_gap: int = 1) -> np.ndarray:
    """``m`` equidistant slice indices (feet to head) with a random gap and start, inside ``[0, n_slices)``.

    Raises ValueError when the scan has fewer than ``m`` slices.
    """
    if n_slices < m:
        raise ValueError(f"{n_slices} slices, at least {m} are needed")
    max_gap = (n_slices - 1) // (m - 1) if m > 1 else 1
    gap = int(rng.integers(min(min_gap, max_gap), max_gap + 1))
    start = int(rng.integers(0, n_slices - gap * (m - 1)))
    return start + gap * np.arange(m)
