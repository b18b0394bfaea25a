"""Training-time augmentations of BPR slices, after the reference implementation bpreg's defaults.

In order: Gaussian noise, HU shift, HU scaling (each clipped to [-1, 1]), a circular field of view (air outside),
left-right flip, transpose, scale and rotation (reflecting border), Gaussian blur. Unlike bpreg, which draws
every slice's transform anew, the parameters are drawn once per CT and applied to all its m slices, so that the
slices of a sample stay comparable and their order shows only in the anatomy; only the noise pixels differ per slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class SliceAugmentConfig:
    """Probabilities and ranges of the slice augmentations (intensities in the [-1, 1] slice scale)."""

    p_noise: float = 0.5
    noise_std: tuple[float, float] = (0.0, 0.04)  # about 50 HU at most
    p_shift: float = 0.5
    shift: tuple[float, float] = (-0.08, 0.08)  # about 100 HU
    p_scale: float = 0.5
    scale: tuple[float, float] = (0.8, 1.2)
    p_frame: float = 0.25
    frame_radius: float = 0.75  # of the half-width
    p_flip: float = 0.5
    p_transpose: float = 0.5
    p_affine: float = 0.5
    zoom: tuple[float, float] = (0.8, 1.2)
    rotate_deg: tuple[float, float] = (-10.0, 10.0)
    p_blur: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.0)  # pixels


#: named augmentation sets: ``light`` leaves out bpreg's transpose and scale/rotate, which kept our measured short
#: runs from learning the feet-to-head order (benchmarks in docs/benchmarks.md); ``bpreg`` is the reference's full set
AUGMENT_PRESETS: dict[str, SliceAugmentConfig | None] = {
    "none": None,
    "light": SliceAugmentConfig(p_transpose=0.0, p_affine=0.0),
    "bpreg": SliceAugmentConfig(),
}


def augment_slices(slices: torch.Tensor, rng: np.random.Generator, cfg: SliceAugmentConfig) -> torch.Tensor:
    """Augment the m slices ``(m, 1, H, W)`` of one CT, values in [-1, 1]; returns ``(m, 1, H, W)``, same dtype.

    Every random parameter is drawn once from ``rng`` and used for all m slices. The transpose needs square
    slices and is skipped otherwise.
    """
    x = slices.float()
    if rng.uniform() < cfg.p_noise:
        std = rng.uniform(*cfg.noise_std)
        x = (x + torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32)) * std).clamp(-1, 1)
    if rng.uniform() < cfg.p_shift:
        x = (x + rng.uniform(*cfg.shift)).clamp(-1, 1)
    if rng.uniform() < cfg.p_scale:
        x = (x * rng.uniform(*cfg.scale)).clamp(-1, 1)
    if rng.uniform() < cfg.p_frame:
        x = x.masked_fill(~circle_mask(x.shape[-2:], cfg.frame_radius), -1.0)
    if rng.uniform() < cfg.p_flip:
        x = x.flip(-2)
    if rng.uniform() < cfg.p_transpose and x.shape[-2] == x.shape[-1]:
        x = x.transpose(-2, -1)
    if rng.uniform() < cfg.p_affine:
        x = scale_rotate(x, rng.uniform(*cfg.zoom), rng.uniform(*cfg.rotate_deg))
    if rng.uniform() < cfg.p_blur:
        x = gaussian_blur(x, rng.uniform(*cfg.blur_sigma))
    return x.clamp(-1, 1).to(slices.dtype).contiguous()


def circle_mask(shape: tuple[int, int], radius: float) -> torch.Tensor:
    """``(H, W)`` bool, true inside the centred circle of ``radius`` times the half-width (of the shorter side)."""
    h, w = shape
    y = torch.arange(h, dtype=torch.float32) - (h - 1) / 2
    z = torch.arange(w, dtype=torch.float32) - (w - 1) / 2
    return y[:, None] ** 2 + z[None, :] ** 2 <= (radius * min(h, w) / 2) ** 2


def scale_rotate(x: torch.Tensor, zoom: float, degrees: float) -> torch.Tensor:
    """Zoom ``(N, C, H, W)`` by ``zoom`` (> 1 enlarges) and rotate it by ``degrees`` about the centre, bilinear,
    reflecting at the border."""
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]) / zoom
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, 1, H, W)`` with ``sigma`` pixels (kernel radius ceil(3 sigma)),
    reflecting at the border."""
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    x = F.pad(x, (r, r, r, r), mode="reflect")
    return F.conv2d(F.conv2d(x, k.view(1, 1, -1, 1)), k.view(1, 1, 1, -1))
