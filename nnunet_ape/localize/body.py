"""The body: its bounding box (the body-box baseline, the label-transfer grid) and the region retrieval searches."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from nnunet_ape.localize.boxes import mask_box
from nnunet_ape.pretrain.choices import FOREGROUND_HU


def body_mask(hu: np.ndarray, slice_axis: int = 2) -> np.ndarray:
    """Body voxels ``(X, Y, Z)`` bool of a CT in HU: the largest connected component above -500 HU with its holes
    filled slice by slice along ``slice_axis`` (lungs and bowel gas are body; air and padding values such as -3024
    outside the scan circle are not). All False when nothing is above -500 HU."""
    labels, n = ndimage.label(hu > FOREGROUND_HU)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    largest = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    filled = np.moveaxis(largest, slice_axis, 0).copy()
    for i, plane in enumerate(filled):
        if plane.any():
            filled[i] = ndimage.binary_fill_holes(plane)
    return np.moveaxis(filled, 0, slice_axis)


def body_box(hu: np.ndarray) -> np.ndarray:
    """Box ``(2, 3)`` (inclusive voxel indices, same axes as ``hu``) of the largest connected component above
    -500 HU; the whole image when nothing is."""
    labels, n = ndimage.label(hu > FOREGROUND_HU)
    if n == 0:
        return np.stack([np.zeros(3), np.asarray(hu.shape) - 1.0])
    return mask_box(labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1)


SEARCH_MARGIN_MM = 5.0  # the body mask grown by this much: skin voxels below -500 HU (partial volume) stay searchable


def search_region(hu: np.ndarray, spacing, margin_mm: float = SEARCH_MARGIN_MM, slice_axis: int = 2) -> np.ndarray:
    """Where retrieval may look on a CT ``(X, Y, Z)`` in HU with ``spacing`` mm per axis: :func:`body_mask` grown by
    ``margin_mm`` (a box-shaped dilation, at least one voxel per axis when the margin is positive), bool of the same
    shape. Outside the body the APE map was never trained to mean anything, and there its values match organ queries
    better than the organ does. The whole image when the CT shows no body."""
    body = body_mask(hu, slice_axis)
    if not body.any():
        return np.ones(hu.shape, dtype=bool)
    if margin_mm <= 0:
        return body
    radius = np.maximum(1, np.round(margin_mm / np.asarray(spacing, dtype=np.float64))).astype(int)
    return ndimage.maximum_filter(body, size=tuple(2 * radius + 1))
