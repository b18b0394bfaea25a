"""Geometry of training views: random patch shapes, spacings and overlapping view boxes.

All boxes live in the canonical frame of one (foreground-cropped) CT, in mm measured from its voxel 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAPER_PATCH_VOLUME = 96 * 96 * 64
PAPER_SPACING_RANGE = ((1.0, 1.0, 1.5), (2.0, 2.0, 3.0))


@dataclass(frozen=True)
class ViewBox:
    """An axis-aligned view: ``shape`` voxels of ``spacing`` mm, voxel 0 at ``start`` mm (canonical x, y, z)."""

    start: np.ndarray
    spacing: np.ndarray
    shape: tuple[int, int, int]

    @property
    def stop(self) -> np.ndarray:
        """Physical position (mm) of the last voxel."""
        return self.start + (np.asarray(self.shape) - 1) * self.spacing

    def to_voxel(self, points_mm: np.ndarray) -> np.ndarray:
        """Physical points ``(..., 3)`` mm -> continuous voxel indices ``(..., 3)`` of this view."""
        return (points_mm - self.start) / self.spacing


def sample_patch_shape(
    rng: np.random.Generator, volume: int = PAPER_PATCH_VOLUME, max_aspect: float = 2.0
) -> tuple[int, int, int]:
    """Random patch shape (voxels) with ``prod(shape) ~= volume`` and ``max(shape) / min(shape) <= max_aspect``."""
    side = volume ** (1 / 3)
    while True:
        log_ratio = rng.uniform(-np.log(max_aspect), np.log(max_aspect), size=3)
        log_ratio -= log_ratio.mean()
        shape = np.maximum(np.round(side * np.exp(log_ratio)), 8).astype(int)
        if shape.max() / shape.min() <= max_aspect:
            return tuple(int(s) for s in shape)  # type: ignore[return-value]


def fit_scan_axis(
    shape: tuple[int, int, int], extent: np.ndarray, max_spacing: np.ndarray, max_fraction: float, axis: int = 2,
    min_size: int = 8,
) -> tuple[int, int, int]:
    """Shorten ``shape`` along the scan ``axis`` (canonical z) so a view of it, at up to ``max_spacing`` mm, spans at
    most ``max_fraction`` of the CT's ``extent`` (mm) there (but keeps ``min_size`` voxels).

    Why: where a view is longer than the scan, the scan's first and last slices show up inside it as a cut through
    the body with air beyond. That cut depends on the acquisition, not the anatomy, yet it is the easiest cue to
    position in the scan: a model trained on such views learns coordinates relative to the scan window (measured
    on phantoms: consistent within a CT, ~120 mm off between CTs). Views shorter than the scan, at varying
    positions, leave anatomy as the only cue that agrees between views.
    """
    if max_fraction <= 0:
        return shape
    longest = int(np.floor(max_fraction * float(extent[axis]) / float(max_spacing[axis]))) + 1
    out = list(shape)
    out[axis] = max(min(out[axis], longest), min_size)
    return tuple(out)  # type: ignore[return-value]


def sample_spacing(
    rng: np.random.Generator, spacing_range: tuple[tuple[float, ...], tuple[float, ...]] = PAPER_SPACING_RANGE
) -> np.ndarray:
    """Random spacing (mm, x y z), each axis uniform in ``[low, high]``."""
    low, high = (np.asarray(r, dtype=np.float64) for r in spacing_range)
    return rng.uniform(low, high)


def sample_view(rng: np.random.Generator, extent: np.ndarray, shape: tuple[int, int, int], spacing: np.ndarray) -> ViewBox:
    """A view of ``shape`` voxels at ``spacing`` placed uniformly so it lies inside ``[0, extent]`` mm where it fits,
    and covers the whole extent (centred with jitter) where it does not."""
    size = (np.asarray(shape) - 1) * spacing
    free = extent - size
    start = np.where(free >= 0, rng.uniform(0, 1, 3) * np.maximum(free, 0), free * rng.uniform(0, 1, 3))
    return ViewBox(start, spacing, shape)


def sample_partner_view(rng: np.random.Generator, view: ViewBox, spacing: np.ndarray, max_shift: float = 0.25) -> ViewBox:
    """A second view of the same shape overlapping ``view``: its centre is shifted by at most ``max_shift``
    (<= 0.5) of ``view``'s size along each axis, so the two boxes always overlap."""
    size = (np.asarray(view.shape) - 1) * view.spacing
    centre = view.start + size / 2 + rng.uniform(-max_shift, max_shift, 3) * size
    partner_size = (np.asarray(view.shape) - 1) * spacing
    return ViewBox(centre - partner_size / 2, spacing, view.shape)


def keep_inside(view: ViewBox, extent: np.ndarray, axis: int = 2) -> ViewBox:
    """``view`` moved along ``axis`` so it lies inside ``[0, extent]`` mm there, where it fits (else unchanged)."""
    free = float(extent[axis]) - float(view.stop[axis] - view.start[axis])
    if free < 0:
        return view
    start = view.start.copy()
    start[axis] = min(max(start[axis], 0.0), free)
    return ViewBox(start, view.spacing, view.shape)


def intersect(lo_a: np.ndarray, hi_a: np.ndarray, lo_b: np.ndarray, hi_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intersection of two boxes given by corners (mm); empty when any ``hi < lo``."""
    return np.maximum(lo_a, lo_b), np.minimum(hi_a, hi_b)


def sample_points(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, k: int) -> np.ndarray:
    """``k`` uniform random points ``(k, 3)`` in mm inside the box ``[lo, hi]``."""
    return lo + rng.uniform(0, 1, (k, 3)) * np.maximum(hi - lo, 0)
