"""Hounsfield units -> network input. One fixed affine map so that random windows in training only clip."""

from __future__ import annotations

import numpy as np
import torch

HU_WINDOW: tuple[float, float] = (-1000.0, 1000.0)  # default clipping window at inference
HU_SCALE = 1000.0
AIR_HU = -1000.0
AIR_VALUE = AIR_HU / HU_SCALE  # network input value of air; used for padding


def floor_at_air(hu: np.ndarray) -> np.ndarray:
    """``hu`` with every value below air (-1000 HU) raised to air, same dtype.

    Nothing scanned is less dense than air: lower values are a scanner's padding outside the scan circle (-3024,
    -2048, -2000 HU, ...). Interpolated, blurred or noised before an HU window clips them, they would drag the
    voxels along the circle's edge far below air and draw the circle, an acquisition trait, into the input.
    """
    return np.maximum(hu, np.asarray(AIR_HU, dtype=hu.dtype))


def normalize_hu(hu: torch.Tensor | np.ndarray, window: tuple[float, float] = HU_WINDOW) -> torch.Tensor:
    """Clip HU to ``window`` and divide by 1000: air -> -1, water -> 0, dense bone -> 1. Returns float32 tensor."""
    x = torch.as_tensor(np.asarray(hu) if not isinstance(hu, torch.Tensor) else hu).float()
    return x.clamp(window[0], window[1]) / HU_SCALE
