"""Honest validation for crop models: a validation case is predicted on the localizer's box, not on its training box.

A training case's preprocessed crop is the localizer's box grown to hold the label (so the network never learns
a cut organ). Validating on that box would let the ground truth choose the region. These dataset classes cut
each case further to the localizer's own box, mapped into the preprocessed grid, and rewrite nnU-Net's crop
properties to match, so nnU-Net's export pastes the prediction back into the full image where the localizer put
it. The mapping is exact up to the rounding of one preprocessed voxel at each face.
"""

from __future__ import annotations

import numpy as np
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, nnUNetDatasetNumpy


def predicted_box_in_preprocessed(properties: dict, preprocessed_shape: tuple[int, ...]) -> tuple[list[slice], np.ndarray]:
    """The localizer's box of a case (``properties['nnunet_ape']['predicted_box_voxels']``, source x/y/z) in the
    case's preprocessed array (transposed, resampled): the array slices, and the matching source region in
    nnU-Net's transposed axes ``(3, 2)`` (low included, high excluded) for ``bbox_used_for_cropping``."""
    record = properties["nnunet_ape"]
    box = np.asarray(record["predicted_box_voxels"])[:, ::-1][:, record["transpose_forward"]]  # zyx, then transposed
    bbox = np.asarray(properties["bbox_used_for_cropping"], dtype=np.int64)
    cropped = np.asarray(properties["shape_after_cropping_and_before_resampling"], dtype=np.float64)
    scale = np.asarray(preprocessed_shape, dtype=np.float64) / cropped
    lo = np.clip(box[0] - bbox[:, 0], 0, cropped)
    hi = np.clip(box[1] - bbox[:, 0], 0, cropped)
    a = np.clip(np.floor(lo * scale).astype(np.int64), 0, np.asarray(preprocessed_shape) - 1)
    b = np.clip(np.ceil(hi * scale).astype(np.int64), a + 1, preprocessed_shape)
    source_lo = bbox[:, 0] + np.round(a / scale).astype(np.int64)
    source_hi = np.maximum(np.minimum(bbox[:, 0] + np.round(b / scale).astype(np.int64), bbox[:, 1]), source_lo + 1)
    return [slice(int(i), int(j)) for i, j in zip(a, b)], np.stack([source_lo, source_hi], axis=1)


def to_predicted_box(data, seg, properties: dict):
    """A preprocessed case ``(C, ...)`` cut to its localizer box, with nnU-Net's crop properties rewritten."""
    if "predicted_box_voxels" not in properties.get("nnunet_ape", {}):
        return data, seg, properties
    cut, region = predicted_box_in_preprocessed(properties, tuple(data.shape[1:]))
    properties = dict(properties)
    properties["bbox_used_for_cropping"] = region.tolist()
    properties["shape_after_cropping_and_before_resampling"] = tuple(int(h - l) for l, h in region)
    index = (slice(None), *cut)
    return data[index], seg[index], properties


class PredictedBoxDatasetBlosc2(nnUNetDatasetBlosc2):
    """nnU-Net's blosc2 dataset, each case cut to the localizer's box (for validation)."""

    def load_case(self, identifier):
        data, seg, seg_prev, properties = super().load_case(identifier)
        data, seg, properties = to_predicted_box(data, seg, properties)
        return data, seg, seg_prev, properties


class PredictedBoxDatasetNumpy(nnUNetDatasetNumpy):
    """nnU-Net's numpy dataset, each case cut to the localizer's box (for validation)."""

    def load_case(self, identifier):
        data, seg, seg_prev, properties = super().load_case(identifier)
        data, seg, properties = to_predicted_box(data, seg, properties)
        return data, seg, seg_prev, properties


def predicted_box_dataset_class(dataset_class: type) -> type:
    """The predicted-box variant of nnU-Net's dataset class ``dataset_class``."""
    return PredictedBoxDatasetNumpy if issubclass(dataset_class, nnUNetDatasetNumpy) else PredictedBoxDatasetBlosc2
