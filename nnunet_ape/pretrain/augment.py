"""Intensity augmentations of one view (they change what the network sees, never where voxels are)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nnunet_ape.intensity import HU_SCALE, HU_WINDOW


@dataclass
class AugmentConfig:
    """Probabilities and ranges of the view augmentations (HU and voxels)."""

    p_window: float = 0.5
    window_low: tuple[float, float] = (-1000.0, -300.0)
    window_high: tuple[float, float] = (100.0, 1000.0)
    p_blur: float = 0.2
    p_sharpen: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    sharpen_strength: tuple[float, float] = (0.5, 1.5)
    p_noise: float = 0.5
    noise_std_hu: tuple[float, float] = (5.0, 50.0)
    p_mask: float = 0.5
    max_masks: int = 3
    max_mask_fraction: float = 0.35


def augment_view(hu: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Augment one view ``(X, Y, Z)`` in HU and return the network input ``(X, Y, Z)`` float32.

    Order: random blur or sharpening, Gaussian noise, clipping to a random HU window, scaling by the
    fixed map of :func:`nnunet_ape.intensity.normalize_hu`, then random box masking (set to 0 = water).
    """
    x = hu.astype(np.float32, copy=False)
    u = rng.uniform()
    if u < cfg.p_blur:
        x = ndimage.gaussian_filter(x, rng.uniform(*cfg.blur_sigma))
    elif u < cfg.p_blur + cfg.p_sharpen:
        blurred = ndimage.gaussian_filter(x, rng.uniform(*cfg.blur_sigma))
        x = x + rng.uniform(*cfg.sharpen_strength) * (x - blurred)
    if rng.uniform() < cfg.p_noise:
        x = x + rng.normal(0, rng.uniform(*cfg.noise_std_hu), x.shape).astype(np.float32)
    low, high = HU_WINDOW
    if rng.uniform() < cfg.p_window:
        low, high = rng.uniform(*cfg.window_low), rng.uniform(*cfg.window_high)
    x = np.clip(x, low, high) / HU_SCALE
    if rng.uniform() < cfg.p_mask:
        for _ in range(rng.integers(1, cfg.max_masks + 1)):
            size = (rng.uniform(0.1, cfg.max_mask_fraction, 3) * np.array(x.shape)).astype(int) + 1
            start = (rng.uniform(0, 1, 3) * (np.array(x.shape) - size + 1)).astype(int)
            x[start[0] : start[0] + size[0], start[1] : start[1] + size[1], start[2] : start[2] + size[2]] = 0.0
    return x.astype(np.float32, copy=False)
