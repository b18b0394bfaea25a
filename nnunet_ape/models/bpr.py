"""Body Part Regression network: one axial slice ``(B, 1, H, W)`` -> one score per slice ``(B,)``.

Trunks come from timm (nnU-Net already installs it), built without pretrained weights (nothing is downloaded):
the last feature map is average-pooled and a linear layer gives the score. ``tiny`` is a small CNN of ours for
tests and CPU experiments.
"""

from __future__ import annotations

import torch
from torch import nn

from nnunet_ape.models.config import TRUNKS


def _tiny_trunk() -> tuple[nn.Module, int]:
    layers, channels = [], 1
    for width in (8, 16, 32, 64):
        layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.LeakyReLU(0.01, inplace=True)]
        channels = width
    return nn.Sequential(*layers), channels


class BPRNet(nn.Module):
    """Slice scorer with a selectable trunk (see :data:`TRUNKS`)."""

    def __init__(self, trunk: str = "efficientnet") -> None:
        super().__init__()
        if trunk not in TRUNKS:
            raise ValueError(f"unknown trunk {trunk!r}; choose one of {', '.join(TRUNKS)}")
        self.trunk_name = trunk
        if trunk == "tiny":
            self.trunk, channels = _tiny_trunk()
        else:
            import timm

            self.trunk = timm.create_model(TRUNKS[trunk], pretrained=False, in_chans=1, features_only=True, out_indices=(-1,))
            channels = self.trunk.feature_info.channels()[-1]
        self.head = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` slices (:func:`nnunet_ape.bpr.slices.normalize_slice_hu`) -> ``(B,)`` scores."""
        features = self.trunk(x)
        if isinstance(features, (list, tuple)):
            features = features[-1]
        return self.head(features.mean(dim=(2, 3))).squeeze(1)
