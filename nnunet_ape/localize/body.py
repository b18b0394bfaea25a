"""The body's bounding box: where anatomy is, for the body-box baseline and the label-transfer grid."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from nnunet_ape.localize.boxes import mask_box
from nnunet_ape.pretrain.cache import FOREGROUND_HU


def body_box(hu: np.ndarray) -> np.ndarray:
    """Box ``(2, 3)`` (inclusive voxel indices, same axes as ``hu``) of the largest connected component above
    -500 HU; the whole image when nothing is."""
    labels, n = ndimage.label(hu > FOREGROUND_HU)
    if n == 0:
        return np.stack([np.zeros(3), np.asarray(hu.shape) - 1.0])
    return mask_box(labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1)
