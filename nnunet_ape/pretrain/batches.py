"""Batches for APE pretraining, built in background workers: all views of one batch come from one CT.

A batch is a dict of tensors:

- ``views``: ``(V, 1, X, Y, Z)`` network inputs; V = 2n for the aug/equiv variants (views 2i and 2i+1 are a
  pair), V = n for the naive variant.
- ``coords``: ``(V, k, 3)`` continuous voxel indices (x, y, z) in each view where embeddings are read.
  For a pair both views carry the same k physical points (the positive pairs).
- ``positions``: ``(n, k, 3)`` physical positions of those points in mm (canonical frame of the CT).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from nnunet_ape.intensity import AIR_HU, floor_at_air
from nnunet_ape.pretrain.augment import AugmentConfig, augment_view
from nnunet_ape.pretrain.cache import CachedCT
from nnunet_ape.pretrain.choices import FOREGROUND_HU, POINT_MODES, VARIANTS
from nnunet_ape.pretrain.views import (
    PAPER_PATCH_VOLUME,
    PAPER_SPACING_RANGE,
    ViewBox,
    fit_scan_axis,
    intersect,
    keep_inside,
    sample_partner_view,
    sample_patch_shape,
    sample_points,
    sample_spacing,
    sample_view,
)
from nnunet_ape.resample import axis_coords, resample_grid


@dataclass
class BatchConfig:
    """What one batch holds: ``pairs`` (n) views or view pairs, ``voxels`` (N) points in total."""

    variant: str = "equiv"
    pairs: int = 8
    voxels: int = 8000
    patch_volume: int = PAPER_PATCH_VOLUME
    max_aspect: float = 2.0
    max_shift: float = 0.25
    max_scan_fraction: float = 0.6  # views span at most this fraction of the CT along z (0: no limit); see fit_scan_axis
    spacing_range: tuple[tuple[float, ...], tuple[float, ...]] = PAPER_SPACING_RANGE
    points: str = "uniform"  # where a view's points fall: one of POINT_MODES (see sample_view_points)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @property
    def points_per_view(self) -> int:
        return max(1, self.voxels // self.pairs)


def extract_view(volume: np.ndarray, spacing: np.ndarray, box: ViewBox) -> np.ndarray:
    """Resample the part of ``volume`` (``(X, Y, Z)`` HU, voxel 0 at 0 mm) under ``box``; air (-1000) outside.

    Values below air (scanner padding) are read as air (:func:`nnunet_ape.intensity.floor_at_air`)."""
    coords = [axis_coords(n, s0 / sp, vs / sp) for n, s0, vs, sp in zip(box.shape, box.start, box.spacing, spacing)]
    # read only the source sub-block the view touches (the volume may be a memory map)
    slices, local = [], []
    for c, size in zip(coords, volume.shape):
        lo = int(max(math.floor(float(c.min())), 0))
        hi = int(min(math.ceil(float(c.max())) + 1, size))
        if hi <= lo:  # view entirely outside along this axis
            return np.full(box.shape, AIR_HU, dtype=np.float32)
        slices.append(slice(lo, hi))
        local.append(c - lo)
    block = torch.from_numpy(floor_at_air(np.asarray(volume[tuple(slices)], dtype=np.float32)))
    # the block reaches the volume's border wherever the view does, so "outside the block" = outside the CT
    return resample_grid(block, local, fill=AIR_HU).numpy()


def sample_view_points(
    rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, k: int, volume: np.ndarray, spacing: np.ndarray, mode: str
) -> np.ndarray:
    """``k`` random points ``(k, 3)`` in mm inside the box ``[lo, hi]`` of ``volume`` (``(X, Y, Z)`` HU, voxel 0 at 0 mm).

    ``mode``: ``uniform`` anywhere in the box (air around the body included); ``body`` only where the nearest voxel
    is above -500 HU; ``balanced`` half body, half not (the APE authors' released code samples 1024 body and 1024
    background voxels per view). Where the box holds too few points of a kind, the others fill the rest.
    """
    if mode not in POINT_MODES:
        raise ValueError(f"unknown point mode {mode!r}; choose one of {POINT_MODES}")
    if mode == "uniform":
        return sample_points(rng, lo, hi, k)
    candidates = sample_points(rng, lo, hi, 8 * k)
    index = np.clip(np.rint(candidates / spacing).astype(np.intp), 0, np.asarray(volume.shape) - 1)
    # body: the threshold of the cache's foreground crop and of the localizer's body mask
    inside = np.asarray(volume[index[:, 0], index[:, 1], index[:, 2]]) > FOREGROUND_HU
    body, other = candidates[inside], candidates[~inside]
    wanted = k if mode == "body" else k // 2
    n_body = min(len(body), max(wanted, k - len(other)))
    return np.concatenate([body[:n_body], other[: k - n_body]])


def make_batch(volume: np.ndarray, spacing: tuple[float, ...], cfg: BatchConfig, rng: np.random.Generator) -> dict:
    """Build one batch (see module docstring) from a canonical, foreground-cropped CT ``(X, Y, Z)`` in HU."""
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    extent = (np.asarray(volume.shape) - 1) * spacing_arr
    shape = sample_patch_shape(rng, cfg.patch_volume, cfg.max_aspect)
    shape = fit_scan_axis(shape, extent, np.asarray(cfg.spacing_range[1], dtype=np.float64), cfg.max_scan_fraction)
    k = cfg.points_per_view
    views, coords, positions = [], [], []
    for _ in range(cfg.pairs):
        first = sample_view(rng, extent, shape, sample_spacing(rng, cfg.spacing_range))
        lo, hi = intersect(first.start, first.stop, np.zeros(3), extent)
        boxes = [first]
        if cfg.variant != "naive":
            for _attempt in range(20):
                second = sample_partner_view(rng, first, sample_spacing(rng, cfg.spacing_range), cfg.max_shift)
                if cfg.max_scan_fraction > 0:
                    second = keep_inside(second, extent)
                lo2, hi2 = intersect(lo, hi, second.start, second.stop)
                if np.all(hi2 > lo2):
                    break
            boxes.append(second)
            lo, hi = lo2, hi2
        points = sample_view_points(rng, lo, hi, k, volume, spacing_arr, cfg.points)
        positions.append(points)
        for box in boxes:
            views.append(augment_view(extract_view(volume, spacing_arr, box), rng, cfg.augment))
            coords.append(box.to_voxel(points))
    return {
        "views": torch.from_numpy(np.stack(views)[:, None]),
        "coords": torch.from_numpy(np.stack(coords).astype(np.float32)),
        "positions": torch.from_numpy(np.stack(positions).astype(np.float32)),
    }


class PairBatches(IterableDataset):
    """Endless stream of batches, each from one randomly chosen cached CT; safe to use with worker processes.

    ``seed`` and ``rank`` make streams of different workers, ranks and resumed runs differ.
    """

    def __init__(self, cts: list[CachedCT], cfg: BatchConfig, seed: int = 0, rank: int = 0) -> None:
        super().__init__()
        if cfg.variant not in VARIANTS:
            raise ValueError(f"unknown variant {cfg.variant!r}; choose one of {VARIANTS}")
        if cfg.points not in POINT_MODES:
            raise ValueError(f"unknown point mode {cfg.points!r}; choose one of {POINT_MODES}")
        self.cts, self.cfg, self.seed, self.rank = cts, cfg, seed, rank

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, self.rank, worker])
        while True:
            ct = self.cts[rng.integers(len(self.cts))]
            volume = np.load(ct.path, mmap_mode="r")
            yield make_batch(volume, ct.spacing, self.cfg, rng)
