"""nnU-Net's intensity augmentations on the image channels only, for inputs that carry embedding channels.

nnU-Net's training pipeline applies noise, blur, brightness, contrast, low-resolution simulation and gamma to every
input channel. Embedding channels (APE x/y/z, BPR) are positions, not intensities: those transforms would move them.
Spatial transforms (rotation, scaling, elastic, mirroring) stay as they are, so each embedding value moves with its
voxel.

Which is which is decided by exclusion, so that a data-augmentation variant with other intensity transforms
(nnU-Net's ``nnUNetTrainerDA5`` and the like) cannot reach the embedding channels unnoticed: batchgeneratorsv2's
image-only transforms change voxel values and are restricted to the image channels, except the few listed in
:data:`ALL_CHANNEL_TRANSFORMS` (they move voxels, touch the segmentation only, or address channels by index); a
transform of neither kind is refused with one line, naming this module.
"""

from __future__ import annotations

import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, ImageOnlyTransform, SegOnlyTransform
from batchgeneratorsv2.transforms.nnunet.random_binary_operator import ApplyRandomBinaryOperatorTransform
from batchgeneratorsv2.transforms.nnunet.remove_connected_components import \
    RemoveRandomConnectedComponentFromOneHotEncodingTransform
from batchgeneratorsv2.transforms.nnunet.seg_to_onehot import MoveSegAsOneHotToDataTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.rot90 import Rot90Transform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.spatial.transpose import TransposeAxesTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import OneOfTransform, RandomTransform

# transforms that must see every channel: they move voxels (the embedding values move with them), change the
# segmentation only, or address channels by index themselves (nnU-Net's masking and cascade transforms)
ALL_CHANNEL_TRANSFORMS = (SpatialTransform, MirrorTransform, Rot90Transform, TransposeAxesTransform, Convert3DTo2DTransform,
                          Convert2DTo3DTransform, SegOnlyTransform, MaskImageTransform, MoveSegAsOneHotToDataTransform,
                          ApplyRandomBinaryOperatorTransform, RemoveRandomConnectedComponentFromOneHotEncodingTransform)
# transforms of voxel values that are not image-only transforms (none in batchgeneratorsv2 today)
IMAGE_VALUE_TRANSFORMS: tuple[type, ...] = ()


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


def _inner(transform: BasicTransform) -> list[BasicTransform]:
    """The transforms a container applies (RandomTransform, OneOfTransform, ComposeTransforms); [] for others."""
    if isinstance(transform, RandomTransform):
        return [transform.transform]
    if isinstance(transform, OneOfTransform):
        return list(transform.list_of_transforms)
    if isinstance(transform, ComposeTransforms):
        return list(transform.transforms)
    return []


def is_intensity_transform(transform: BasicTransform) -> bool:
    """True for a transform of voxel values (bare or in a container, all of whose transforms are such), False for one
    that must see every channel (:data:`ALL_CHANNEL_TRANSFORMS`, or a container of only those). TypeError (one
    line) for a transform of neither kind, or a container that mixes both."""
    inner = _inner(transform)
    if inner:
        kinds = {is_intensity_transform(t) for t in inner}
        if len(kinds) > 1:
            raise TypeError(f"nnunet-ape: {type(transform).__name__} mixes intensity and spatial augmentations; the "
                            f"embedding channels must get the spatial ones only: split it")
        return kinds.pop()
    if isinstance(transform, (FirstChannelsOnly, *ALL_CHANNEL_TRANSFORMS)):
        return False
    if isinstance(transform, (ImageOnlyTransform, *IMAGE_VALUE_TRANSFORMS)):
        return True
    raise TypeError(f"nnunet-ape: cannot tell whether augmentation {type(transform).__name__} changes intensities "
                    f"(the embedding channels must not get it) or moves voxels (they must); add its class to "
                    f"IMAGE_VALUE_TRANSFORMS or ALL_CHANNEL_TRANSFORMS in nnunet_ape/nnunet/channel_augmentation.py")


def intensity_on_image_channels(transforms: ComposeTransforms, n_image_channels: int) -> ComposeTransforms:
    """nnU-Net's training transforms with every intensity augmentation (:func:`is_intensity_transform`) restricted to
    the first ``n_image_channels`` channels (the CT and other source channels); everything else untouched and in
    order. TypeError (one line) for a transform that is neither an intensity nor an all-channel one."""
    return ComposeTransforms([FirstChannelsOnly(t, n_image_channels) if is_intensity_transform(t) else t
                              for t in transforms.transforms])
