"""Hounsfield units -> network input. One fixed affine map so that random windows in training only clip."""

from __future__ import annotations

import numpy as np
import torch

HU_WINDOW: tuple[float, float] = (-1000.0, 1000.0)  # default clipping window at inference
HU_SCALE = 1000.0
AIR_VALUE = HU_WINDOW[0] / HU_SCALE  # network input value of air; used for padding


def normalize_hu(hu: torch.Tensor | np.ndarray, window: tuple[float, float] = HU_WINDOW) -> torch.Tensor:
    """Clip HU to ``window`` and divide by 1000: air -> -1, water -> 0, dense bone -> 1. Returns float32 tensor."""
    x = torch.as_tensor(np.asarray(hu) if not isinstance(hu, torch.Tensor) else hu).float()
    return x.clamp(window[0], window[1]) / HU_SCALE
