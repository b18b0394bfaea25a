"""nnU-Net's intensity augmentations on the image channels only, for inputs that carry embedding channels.

nnU-Net's training pipeline applies noise, blur, brightness, contrast, low-resolution simulation and gamma to every
input channel. Embedding channels (APE x/y/z, BPR) are positions, not intensities: those transforms would move them.
Spatial transforms (rotation, scaling, elastic, mirroring) stay as they are, so each embedding value moves with its
voxel.
"""

from __future__ import annotations

import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

INTENSITY_TRANSFORMS = (GaussianNoiseTransform, GaussianBlurTransform, MultiplicativeBrightnessTransform,
                        ContrastTransform, SimulateLowResolutionTransform, GammaTransform)


class FirstChannelsOnly(BasicTransform):
    """Apply ``transform`` to the first ``n`` image channels of a sample ``(C, X, Y, Z)``; the others pass
    unchanged. Module-level and plain attributes, so nnU-Net's data-loading workers can pickle it."""

    def __init__(self, transform: BasicTransform, n: int):
        super().__init__()
        self.transform = transform
        self.n = n

    def __call__(self, **data_dict) -> dict:
        image = data_dict["image"]
        out = self.transform(**{**data_dict, "image": image[: self.n]})
        data_dict.update({k: v for k, v in out.items() if k != "image"})
        data_dict["image"] = torch.cat([out["image"], image[self.n:]], dim=0)
        return data_dict

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, transform={self.transform})"


def is_intensity_transform(transform: BasicTransform) -> bool:
    """True for nnU-Net's intensity augmentations, bare or wrapped in a RandomTransform."""
    inner = transform.transform if isinstance(transform, RandomTransform) else transform
    return isinstance(inner, INTENSITY_TRANSFORMS)


def intensity_on_image_channels(transforms: ComposeTransforms, n_image_channels: int) -> ComposeTransforms:
    """nnU-Net's training transforms with every intensity augmentation restricted to the first
    ``n_image_channels`` channels (the CT and other source channels); everything else untouched and in order."""
    return ComposeTransforms([FirstChannelsOnly(t, n_image_channels) if is_intensity_transform(t) else t
                              for t in transforms.transforms])
