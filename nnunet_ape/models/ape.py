"""The APE network as the paper describes it: UNet-like, stride-4 stem, non-affine BatchNorm, trilinear x4 head.

Input ``(B, 1, H, W, D)`` (CT intensities after :func:`nnunet_ape.intensity.normalize_hu`, axes in canonical
x, y, z order), output ``(B, 3, H, W, D)``: each voxel's position in an "average patient", zero mean and
unit std per channel by construction (over the training batches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ape.intensity import AIR_VALUE, normalize_hu
from nnunet_ape.models.config import PRESETS, STEM_STRIDE, APEConfig  # noqa: F401 (PRESETS: re-exported)
from nnunet_ape.models.point_reading import read_upsampled_at


def _conv_bn_act(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm3d(c_out),
        nn.LeakyReLU(0.01, inplace=True),
    )


def _stage(c_in: int, c_out: int, n: int, stride: int = 1) -> nn.Sequential:
    layers = [_conv_bn_act(c_in, c_out, stride)]
    layers += [_conv_bn_act(c_out, c_out) for _ in range(n - 1)]
    return nn.Sequential(*layers)


class APENet(nn.Module):
    """UNet-like APE network; any input size works (padded internally with air, cropped back)."""

    def __init__(self, config: APEConfig | None = None) -> None:
        super().__init__()
        self.config = config or APEConfig()
        w = self.config.widths
        n = self.config.convs_per_level
        self.stem = nn.Sequential(
            nn.Conv3d(1, w[0], kernel_size=STEM_STRIDE, stride=STEM_STRIDE, bias=False),
            nn.BatchNorm3d(w[0]),
            nn.LeakyReLU(0.01, inplace=True),
        )
        self.encoder = nn.ModuleList(
            [_stage(w[0], w[0], n)] + [_stage(w[i - 1], w[i], n, stride=2) for i in range(1, len(w))]
        )
        self.up = nn.ModuleList(
            [nn.ConvTranspose3d(w[i], w[i - 1], kernel_size=2, stride=2, bias=False) for i in range(1, len(w))]
        )
        self.decoder = nn.ModuleList([_stage(2 * w[i - 1], w[i - 1], n) for i in range(1, len(w))])
        self.head = nn.Conv3d(w[0], self.config.embed_dim, kernel_size=1)
        self.norm = nn.BatchNorm3d(self.config.embed_dim, affine=False)

    @staticmethod
    def input_from_hu(hu) -> torch.Tensor:
        """HU ``(X, Y, Z)`` -> network input (:func:`nnunet_ape.intensity.normalize_hu`)."""
        return normalize_hu(hu)

    def forward(self, x: torch.Tensor, points: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, 1, H, W, D)`` -> ``(B, embed_dim, H, W, D)``.

        With ``points`` ``(B, k, 3)`` (continuous voxel indices x, y, z of the input), only the map's values there,
        ``(B, k, embed_dim)`` float32: the same numbers as reading the full map trilinearly
        (:func:`nnunet_ape.pretrain.loss.sample_embeddings`), without upsampling to every voxel (pretraining reads
        about a thousand points of each view).
        """
        size = x.shape[-3:]
        d = self.config.divisor
        pad = [(-s) % d for s in size]
        if any(pad):
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), value=AIR_VALUE)
        skips = []
        h = self.stem(x)
        for stage in self.encoder:
            h = stage(h)
            skips.append(h)
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
            h = self.decoder[i](torch.cat([h, skips[i]], dim=1))
        h = self.norm(self.head(h))
        if points is not None:
            return read_upsampled_at(h, points, STEM_STRIDE, size)
        h = F.interpolate(h, scale_factor=STEM_STRIDE, mode="trilinear", align_corners=False)
        return h[..., : size[0], : size[1], : size[2]]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
