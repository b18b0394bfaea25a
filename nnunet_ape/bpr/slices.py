"""Axial slices as BPR inputs, as the reference implementation prepares them: in-plane spacing 3.5 mm,
128 x 128 pixels centred on the image, HU clipped to [-1000, 1500]; and sampling of m equidistant slices."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_ape.intensity import floor_at_air
from nnunet_ape.canonical import CanonicalCT, canonical_ct
from nnunet_ape.io import Volume

SLICE_MM = 3.5
SLICE_SIZE = 128
SLICE_HU = (-1000.0, 1500.0)


def normalize_slice_hu(hu: torch.Tensor, window: tuple[float, float] = SLICE_HU) -> torch.Tensor:
    """HU -> [-1, 1] after clipping to ``window``."""
    low, high = window
    return (hu.float().clamp(low, high) - low) / (high - low) * 2.0 - 1.0


BODY_HU = -500.0
MIN_BODY_PIXELS = 20


def slice_centre(hu: np.ndarray) -> tuple[float, float]:
    """In-plane voxel position ``(x, y)`` a BPR slice is centred on: the centroid of the body (pixels above -500 HU)
    of the axial slice ``hu`` ``(X, Y)``, or the image centre when the slice shows (almost) no body."""
    body = hu > BODY_HU
    count = int(body.sum())
    if count < MIN_BODY_PIXELS:
        return (hu.shape[0] - 1) / 2, (hu.shape[1] - 1) / 2
    along_x, along_y = body.sum(axis=1), body.sum(axis=0)
    return float(along_x @ np.arange(hu.shape[0]) / count), float(along_y @ np.arange(hu.shape[1]) / count)


def axial_slices(
    volume: Volume | CanonicalCT, z_indices: Sequence[int], pixel_mm: float = SLICE_MM, size: int = SLICE_SIZE,
    centre_on_body: bool = True,
) -> torch.Tensor:
    """BPR inputs ``(len(z_indices), 1, size, size)`` for canonical axial slices ``z_indices`` of a CT.

    The CT is brought to canonical (LPS) order first (unless it comes as a :class:`~nnunet_ape.canonical.CanonicalCT`
    already), so ``z_indices`` count from the feet; each slice is
    resampled to ``pixel_mm`` in plane on a ``size`` x ``size`` grid (air outside) centred on the slice's body
    (:func:`slice_centre`), so a scan cropped or shifted in plane gives the same input; ``centre_on_body=False``
    centres on the image, as bpreg does. Values below air (scanner padding) are read as air before resampling.
    Rows run along x (patient right to left), columns along y (anterior to posterior).
    """
    canon = canonical_ct(volume).canon
    planes = np.stack([np.asarray(canon.array[:, :, z], dtype=np.float32) for z in z_indices])  # (B, X, Y)
    planes = torch.from_numpy(floor_at_air(planes))
    n_x, n_y = planes.shape[1:]
    if centre_on_body:
        centres = torch.tensor([slice_centre(p) for p in planes.numpy()], dtype=torch.float32)
    else:
        centres = torch.tensor([[(n_x - 1) / 2, (n_y - 1) / 2]]).expand(len(planes), 2)
    offsets = (torch.arange(size, dtype=torch.float32) - (size - 1) / 2) * pixel_mm
    rows = centres[:, 0, None] + offsets / canon.spacing[0]  # (B, size) source x index
    cols = centres[:, 1, None] + offsets / canon.spacing[1]  # (B, size) source y index
    grid = torch.stack(  # grid_sample wants (width, height) = (y, x), normalized to [-1, 1]
        [(2 * cols / max(n_y - 1, 1) - 1)[:, None, :].expand(-1, size, -1), (2 * rows / max(n_x - 1, 1) - 1)[:, :, None].expand(-1, -1, size)],
        dim=-1,
    )
    fill = SLICE_HU[0]
    hu = F.grid_sample(planes[:, None] - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=True) + fill
    return normalize_slice_hu(hu)


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
