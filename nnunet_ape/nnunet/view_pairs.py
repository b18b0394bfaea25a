"""nnU-Net's data loader for APE pretraining: overlapping view pairs of one preprocessed case that carry positions.

Each batch comes from one case (the APE loss compares positions within one CT). Elements 2i and 2i+1 are two
patches of it, the second shifted by at most ``max_shift`` of the patch size along each axis, so they overlap.
Before nnU-Net's transforms, four channels are appended to each patch: the position of each voxel in mm along each
axis of the preprocessed array (voxel index times the plans' spacing) and 1 where the voxel lies inside the scan.
nnU-Net's spatial augmentations move them with their voxels (rotation and scaling are affine, trilinear
interpolation keeps positions exact); the trainer restricts its intensity augmentations to the image channels.
The batch is ``{"data": (B, C, *patch), "target": (B, 4, *patch), "keys": ...}``.

Scan window (``max_scan_fraction``, as ``pretrain ape --max-scan-fraction``): along the scan axis each view shows
at most this fraction of the case, at a random place of its own, and zeros (nnU-Net's padding value) beyond. A
patch that holds the whole scan would otherwise show both cut ends of the scan in both views of a pair, at the same
physical place: a cue to a position in the scan window, not in the body, that satisfies the loss without anatomy.
"""

from __future__ import annotations

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from threadpoolctl import threadpool_limits


def scan_window(length: int, patch: int, fraction: float, rng=np.random) -> tuple[int, int]:
    """A random visible range ``[start, stop)`` of voxels along the scan axis of a case ``length`` long, for a view
    ``patch`` voxels long: ``min(patch, fraction * length)`` voxels inside the case (the whole case when
    ``fraction`` is 0)."""
    if fraction <= 0:
        return 0, length
    size = int(max(1, min(patch, np.floor(fraction * length))))
    start = int(rng.randint(0, length - size + 1))
    return start, start + size


def shifted_window(window: tuple[int, int], length: int, max_shift: float, rng=np.random) -> tuple[int, int]:
    """``window`` moved by at most ``max_shift`` of its size, kept inside ``[0, length)``."""
    size = window[1] - window[0]
    start = int(np.clip(window[0] + round(rng.uniform(-max_shift, max_shift) * size), 0, length - size))
    return start, start + size


def patch_start_for_window(window: tuple[int, int], patch: int, final_patch: int, rng=np.random) -> int:
    """First voxel of a ``patch``-long crop (nnU-Net crops the centred ``final_patch`` out of it after augmentation)
    whose final part holds the whole ``window`` where it fits, else lies inside it."""
    low, high = sorted((window[1] - final_patch, window[0]))
    return int(rng.randint(low, high + 1)) - (patch - final_patch) // 2


def position_channels(box: list[list[int]], shape: tuple[int, ...], spacing: np.ndarray, scan_axis: int,
                      window: tuple[int, int]) -> torch.Tensor:
    """``(4, *patch)`` float32 channels of the crop ``box`` (``[[start, stop], ...]`` voxels of a case of
    ``shape``): positions in mm (index * spacing) along each axis, then 1 inside the case and the scan window."""
    axes = [torch.arange(start, stop, dtype=torch.float32) for start, stop in box]
    grids = torch.meshgrid(*axes, indexing="ij")
    inside = torch.ones(grids[0].shape, dtype=torch.bool)
    for d, grid in enumerate(grids):
        low, high = window if d == scan_axis else (0, shape[d])
        inside &= (grid >= low) & (grid < high)
    return torch.stack([g * float(s) for g, s in zip(grids, spacing)] + [inside.float()])


class ViewPairDataLoader(nnUNetDataLoader):
    """nnU-Net's data loader, batches of view pairs with position channels (module docstring). Extra arguments:
    ``spacing`` mm per axis of the preprocessed arrays (the configuration's), ``scan_axis`` the slice axis among
    them, ``max_shift`` and ``max_scan_fraction`` as in ``pretrain ape``."""

    def __init__(self, *args, spacing, scan_axis: int, max_shift: float = 0.25, max_scan_fraction: float = 0.6, **kwargs):
        super().__init__(*args, **kwargs)
        if self.batch_size % 2:
            raise ValueError(f"APE view pairs need an even batch size, got {self.batch_size}")
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.scan_axis, self.max_shift, self.max_scan_fraction = scan_axis, max_shift, max_scan_fraction

    def _pair_boxes(self, shape: tuple[int, ...], class_locations) -> list[tuple[list[list[int]], tuple[int, int]]]:
        """Two crop boxes and their scan windows: the first where nnU-Net would crop, the second shifted."""
        axis = self.scan_axis
        first_lbs, _ = self.get_bbox(shape, False, class_locations)
        windows = [scan_window(shape[axis], self.final_patch_size[axis], self.max_scan_fraction)]
        windows.append(shifted_window(windows[0], shape[axis], self.max_shift))
        shifts = [round(np.random.uniform(-self.max_shift, self.max_shift) * p) for p in self.final_patch_size]
        out = []
        for i, window in enumerate(windows):
            lbs = [lb + (shift if i else 0) for lb, shift in zip(first_lbs, shifts)]
            if self.max_scan_fraction > 0:
                lbs[axis] = patch_start_for_window(window, self.patch_size[axis], self.final_patch_size[axis])
            out.append(([[lb, lb + p] for lb, p in zip(lbs, self.patch_size)], window))
        return out

    def generate_train_batch(self) -> dict:
        key = self.get_indices()[0]
        data, seg, _, properties = self._data.load_case(key)
        shape = data.shape[1:]
        images, targets = [], []
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for _pair in range(self.batch_size // 2):
                for box, window in self._pair_boxes(shape, properties["class_locations"]):
                    image = torch.from_numpy(crop_and_pad_nd(data, box, 0)).float()
                    channels = position_channels(box, shape, self.spacing, self.scan_axis, window)
                    image[:, channels[3] == 0] = 0  # outside the case (already 0) and outside the view's scan window
                    labels = torch.from_numpy(crop_and_pad_nd(seg, box, -1, cast_cropped_to=np.int16)).to(torch.int16)
                    sample = torch.cat([image, channels])
                    if self.transforms is not None:
                        sample = self.transforms(image=sample, segmentation=labels)["image"]
                    images.append(sample[: data.shape[0]])
                    targets.append(sample[data.shape[0]:])
        return {"data": torch.stack(images), "target": torch.stack(targets), "keys": [key] * self.batch_size}
