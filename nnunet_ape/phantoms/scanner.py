"""The acquisition (field of view, spacing, orientation, noise) and the scanner model that turns HU into an image."""

from __future__ import annotations

from dataclasses import dataclass

import SimpleITK as sitk
import numpy as np
import numpy.typing as npt
from scipy import ndimage

from nnunet_ape.phantoms.template import (BODY_LENGTH_MM, F32, FOV_LENGTH_MM, HU_RANGE, INPLANE_SPACING_MM, MAX_VOXELS,
                                          NOISE_STD_HU, SLICE_SPACING_MM)
from nnunet_ape.phantoms.patient import _Patient

# Acquisition
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Acquisition:
    spacing: tuple[float, float, float]  # (sx, sy, sz) mm
    lo: tuple[float, float, float]  # body mm of the lowest voxel centre, LPS-ascending
    size: tuple[int, int, int]  # (nx, ny, nz)
    flip_xy: bool  # direction diag(-1, -1, 1)
    offset: tuple[float, float, float]  # world mm = body mm + offset
    noise_std: float
    blur_vox: tuple[float, float, float]  # Gaussian sigma in voxels, (z, y, x)


def _inplane_extent(pat: _Patient, z0: float, z1: float) -> tuple[npt.NDArray, npt.NDArray]:
    """Body bounding box in x/y (body mm) over the z window [z0, z1] (body mm)."""
    z = np.linspace(z0, z1, 64) / pat.scale
    a, ba, bp = pat.profile.skin_axes(z.astype(np.float32))
    lo = -np.array([a.max(), ba.max()]) * pat.scale
    hi = np.array([a.max(), bp.max()]) * pat.scale
    return lo, hi


def _draw_acquisition(rng: np.random.Generator, pat: _Patient) -> _Acquisition:
    """Draw z window, spacing, geometry and noise, keeping <= MAX_VOXELS.

    Rejection sampling keeps the spacing/FOV distributions uniform apart from
    the combinations that would exceed the voxel budget.
    """
    body_len = BODY_LENGTH_MM * pat.scale
    for attempt in range(200):
        length = rng.uniform(*FOV_LENGTH_MM)
        z0 = rng.uniform(0.0, body_len - length)
        sxy, sz = rng.uniform(*INPLANE_SPACING_MM), rng.uniform(*SLICE_SPACING_MM)
        if attempt == 199:
            sxy, sz = INPLANE_SPACING_MM[1], SLICE_SPACING_MM[1]
        lo, hi = _inplane_extent(pat, z0, z0 + length)
        margin_lo, margin_hi = rng.uniform(8, 40, 2), rng.uniform(8, 40, 2)
        lo, hi = lo - margin_lo, hi + margin_hi
        nx, ny = (np.ceil((hi - lo) / sxy).astype(int) + 1).tolist()
        nz = int(np.ceil(length / sz)) + 1
        if nx * ny * nz <= MAX_VOXELS:
            break
    blur = (rng.uniform(0.3, 0.6), *[rng.uniform(0.35, 0.75)] * 2)
    return _Acquisition(
        spacing=(sxy, sxy, sz),
        lo=(float(lo[0]), float(lo[1]), float(z0)),
        size=(nx, ny, nz),
        flip_xy=bool(rng.random() < 0.5),
        offset=(rng.uniform(-50, 50), rng.uniform(-50, 50), rng.uniform(-500, 500)),
        noise_std=rng.uniform(*NOISE_STD_HU),
        blur_vox=blur,
    )




# ---------------------------------------------------------------------------
# Scanner model and image assembly
# ---------------------------------------------------------------------------
def _gauss_noise_gain(sigma_vox: tuple[float, ...], truncate: float) -> float:
    """Std of unit white noise after scipy's Gaussian filter with these sigmas."""
    gain = 1.0
    for s in sigma_vox:
        radius = int(truncate * s + 0.5)
        w = np.exp(-0.5 * (np.arange(-radius, radius + 1) / s) ** 2)
        gain *= float(np.sqrt(((w / w.sum()) ** 2).sum()))
    return gain


def _scan(hu: F32, acq: _Acquisition, rng: np.random.Generator) -> npt.NDArray[np.int16]:
    """Partial-volume blur plus correlated noise of std ``acq.noise_std``; int16 HU.

    Noise is added before the blur (so it gets CT-like texture) with its
    amplitude raised by the filter's gain so the output std is as drawn.
    """
    truncate = 3.0
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    noise *= acq.noise_std / _gauss_noise_gain(acq.blur_vox, truncate)
    hu += noise
    out = ndimage.gaussian_filter(hu, acq.blur_vox, mode="nearest", truncate=truncate)
    np.rint(out, out=out)
    np.clip(out, *HU_RANGE, out=out)
    return out.astype(np.int16)


def _to_image(arr: npt.NDArray, acq: _Acquisition) -> sitk.Image:
    """Wrap a template-ordered [z, y, x] array into an image with acq geometry."""
    sx, sy, sz = acq.spacing
    nx, ny, _ = acq.size
    origin = np.array(acq.lo) + np.array(acq.offset)
    direction = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    if acq.flip_xy:
        # Index 0 sits at the largest x and y; flip the array to match.
        arr = arr[:, ::-1, ::-1]
        origin[0] += (nx - 1) * sx
        origin[1] += (ny - 1) * sy
        direction = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.SetSpacing((sx, sy, sz))
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetDirection(direction)
    return img
