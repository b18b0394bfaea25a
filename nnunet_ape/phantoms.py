"""Synthetic CT-like phantoms with organ labels.

Each seed defines one virtual patient (a body from the pelvis, z = 0, up to the
lung apex, z ~ 650 mm, with random size, shape and organ placement) and one
acquisition of it (a random z window, spacing, origin, direction and noise).

Coordinates follow SimpleITK / DICOM LPS: +x = patient left, +y = posterior,
+z = superior. Numpy arrays are indexed [z, y, x] as returned by
``SimpleITK.GetArrayFromImage``.

Shapes are described in a *template* frame (mm of an average patient, body
centred on x = y = 0). A voxel at body coordinate ``p`` (mm) is evaluated at
template coordinate ``p / scale``, so the overall patient scale needs no special
care anywhere else. All shapes are implicit functions evaluated with numpy
broadcasting on axis-aligned sub-boxes of the voxel grid.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage

__all__ = ["ORGAN_LABELS", "anatomical_z", "make_phantom", "write_cohort"]

ORGAN_LABELS: dict[str, int] = {
    "liver": 1,
    "spleen": 2,
    "kidney_right": 3,
    "kidney_left": 4,
    "aorta": 5,
    "bladder": 6,
    "lung_right": 7,
    "lung_left": 8,
    "spine": 9,
}

BODY_LENGTH_MM = 650.0  # template length from pelvis to lung apex
MAX_VOXELS = 4_000_000
FOV_LENGTH_MM = (200.0, 450.0)
INPLANE_SPACING_MM = (1.5, 3.0)
SLICE_SPACING_MM = (2.0, 5.0)
NOISE_STD_HU = (5.0, 25.0)
HU_RANGE = (-1024, 3071)  # what a 12-bit CT scanner stores

F32 = npt.NDArray[np.float32]
Bounds = tuple[tuple[float, float, float], tuple[float, float, float]]

# ---------------------------------------------------------------------------
# Template anatomy (mm, average patient). Body profile = outer boundary of the
# muscle layer; subcutaneous fat is added outside it, the cavity lies inside.
# ---------------------------------------------------------------------------
_PROFILE_Z = np.array([-60, 0, 100, 200, 280, 360, 450, 550, 650, 720], float)
_PROFILE_A = np.array([150, 155, 160, 150, 130, 135, 145, 150, 140, 130], float)
_PROFILE_B_ANT = np.array([88, 88, 90, 95, 95, 92, 90, 85, 75, 70], float)
_PROFILE_B_POST = np.array([95, 95, 90, 82, 78, 82, 92, 95, 92, 88], float)

# Vertebral-body centre line (y, posterior positive) along z: sacral tilt,
# lumbar lordosis, thoracic kyphosis.
_SPINE_Z = np.array([0, 60, 160, 260, 360, 460, 560, 720], float)
_SPINE_Y = np.array([58, 52, 33, 16, 22, 38, 44, 36], float)

# name: (centre xyz, semi-axes xyz, yaw about z [deg], tilt about y [deg])
_ORGANS: dict[str, tuple[tuple[float, ...], tuple[float, ...], float, float]] = {
    "liver": ((-58, -2, 405), (78, 80, 72), 0, 0),
    "liver_left_lobe": ((5, -46, 425), (55, 30, 33), -15, 0),
    "spleen": ((80, 42, 405), (26, 50, 44), 35, 0),
    "kidney_right": ((-62, 38, 288), (25, 22, 52), 30, -12),
    "kidney_left": ((62, 38, 303), (25, 22, 52), -30, 12),
    "bladder": ((0, -45, 82), (42, 33, 36), 0, 0),
    "heart": ((18, -32, 482), (58, 48, 55), 35, 0),
    "stomach": ((52, -22, 398), (40, 34, 44), -30, 0),
    "lung_right": ((-68, 12, 548), (68, 92, 128), 0, 0),
    "lung_left": ((70, 12, 548), (64, 92, 124), 0, 0),
}
# Organs moved and resized together (liver lobes) or partly together (kidneys).
_ORGAN_GROUPS = {"liver_left_lobe": "liver"}

# Smooth random fields: name -> (lattice cell [template mm], lattice blur [cells]).
_FIELDS: dict[str, tuple[float, float]] = {
    "shape": (30.0, 1.0),
    "fat": (18.0, 0.7),
    "bowel": (13.0, 0.7),
    "gas": (16.0, 0.7),
    "tex": (5.0, 0.0),
    "vessel_a": (11.0, 0.8),
    "vessel_b": (11.0, 0.8),
}
_FIELD_BOX: Bounds = ((-320.0, -260.0, -80.0), (320.0, 260.0, 760.0))

_UNLABELLED = 0


# ---------------------------------------------------------------------------
# Random fields
# ---------------------------------------------------------------------------
@dataclass
class _NoiseBank:
    """Smooth random fields of one patient, defined in template space.

    Values live on a coarse lattice covering the whole virtual body and are
    linearly interpolated, so a patient's texture does not depend on the
    acquisition. Lattices are built lazily from a fixed per-field seed.
    """

    seed: np.random.SeedSequence
    _lattices: dict[str, F32] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._seeds = dict(zip(_FIELDS, self.seed.spawn(len(_FIELDS))))

    def lattice(self, name: str) -> F32:
        """Return the (cz, cy, cx) lattice of field ``name`` (unit std)."""
        if name not in self._lattices:
            cell, blur = _FIELDS[name]
            lo, hi = np.array(_FIELD_BOX[0]), np.array(_FIELD_BOX[1])
            nx, ny, nz = (np.ceil((hi - lo) / cell).astype(int) + 2).tolist()
            rng = np.random.default_rng(self._seeds[name])
            lat = rng.standard_normal((nz, ny, nx), dtype=np.float32)
            if blur > 0:
                lat = ndimage.gaussian_filter(lat, blur, mode="wrap")
                lat /= lat.std()
            self._lattices[name] = lat
        return self._lattices[name]

    def sample(self, name: str, x: F32, y: F32, z: F32) -> F32:
        """Sample field ``name`` on the grid spanned by 1D template coordinates.

        x, y, z: ascending 1D coordinate arrays (mm). Returns (nz, ny, nx).
        """
        out = self.lattice(name)
        cell = _FIELDS[name][0]
        for axis, coords, lo in ((2, x, _FIELD_BOX[0][0]), (1, y, _FIELD_BOX[0][1]),
                                 (0, z, _FIELD_BOX[0][2])):
            out = _lerp_axis(out, axis, coords, lo, cell)
        return out


def _lerp_axis(arr: F32, axis: int, coords: F32, origin: float, cell: float) -> F32:
    """Linearly interpolate a lattice along one axis at physical ``coords``."""
    f = (coords.astype(np.float64) - origin) / cell
    i0 = np.clip(np.floor(f).astype(np.intp), 0, arr.shape[axis] - 2)
    # Crop first so the gathers below touch only the needed lattice planes.
    first, last = int(i0.min()), int(i0.max()) + 2
    arr = np.take(arr, np.arange(first, last), axis=axis)
    i0 -= first
    shape = [1, 1, 1]
    shape[axis] = -1
    w = np.clip(f - (i0 + first), 0.0, 1.0).astype(np.float32).reshape(shape)
    a = np.take(arr, i0, axis=axis)
    b = np.take(arr, i0 + 1, axis=axis)
    b -= a
    b *= w
    a += b
    return a


# ---------------------------------------------------------------------------
# Patient
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Organ:
    """Ellipsoid in template space; rows of ``rot`` are its local axes."""

    center: tuple[float, float, float]
    semi: tuple[float, float, float]
    rot: tuple[tuple[float, float, float], ...]

    def q(self, reg: _Region) -> F32:
        """Normalised squared radius (<= 1 inside) on a region, (nz, ny, nx)."""
        d = (reg.x - self.center[0], reg.y - self.center[1], reg.z - self.center[2])
        q = None
        for row, s in zip(self.rot, self.semi):
            u = (row[0] / s) * d[0] + (row[1] / s) * d[1] + (row[2] / s) * d[2]
            q = u * u if q is None else q + u * u
        return q

    def bounds(self, pad: float = 1.15) -> Bounds:
        """Axis-aligned template bounding box, enlarged by ``pad``."""
        rot, semi = np.array(self.rot), np.array(self.semi)
        half = pad * np.sqrt(((rot * semi[:, None]) ** 2).sum(axis=0))
        c = np.array(self.center)
        return tuple((c - half).tolist()), tuple((c + half).tolist())


@dataclass(frozen=True)
class _Profile:
    """Body cross-section along z (template mm)."""

    a: tuple[float, ...]  # half-width of the muscle layer at _PROFILE_Z
    b_ant: tuple[float, ...]
    b_post: tuple[float, ...]
    fat: float  # subcutaneous fat thickness (template mm)
    belly: float  # extra anterior fat over the abdomen (factor)
    muscle: float  # thickness of the muscle wall

    def muscle_axes(self, z: F32) -> tuple[F32, F32, F32]:
        """Semi-axes (a, b_ant, b_post) of the muscle outer boundary at z."""
        return (_interp(z, _PROFILE_Z, self.a), _interp(z, _PROFILE_Z, self.b_ant),
                _interp(z, _PROFILE_Z, self.b_post))

    def skin_axes(self, z: F32) -> tuple[F32, F32, F32]:
        """Semi-axes of the skin surface at z."""
        a, ba, bp = self.muscle_axes(z)
        belly = _interp(z, [120, 200, 380, 450], [1, self.belly, self.belly, 1])
        return a + self.fat, ba + self.fat * belly, bp + 0.6 * self.fat

    def cavity_axes(self, z: F32) -> tuple[F32, F32, F32]:
        """Semi-axes of the body cavity (inside the muscle wall) at z."""
        a, ba, bp = self.muscle_axes(z)
        return a - self.muscle, ba - self.muscle, bp - self.muscle


@dataclass(frozen=True)
class _Spine:
    """Vertebral column: centre line, body sizes and level boundaries (z)."""

    y_ctrl: tuple[float, ...]  # at _SPINE_Z
    lateral_amp: float  # mild scoliosis
    lateral_phase: float
    sacrum_lo: float
    s1_top: float
    body_lo: tuple[float, ...]  # L5 .. T1
    body_hi: tuple[float, ...]
    n_lumbar: int = 5

    def y(self, z: F32) -> F32:
        """Vertebral-body centre y (mm) at template z."""
        return _interp(z, _SPINE_Z, self.y_ctrl)

    def x(self, z: F32) -> F32:
        """Vertebral-body centre x (mm) at template z."""
        return (self.lateral_amp * np.sin(z / 260.0 + self.lateral_phase)).astype(np.float32)

    def rx(self, z: F32) -> F32:
        """Vertebral-body half-width (mm) at template z."""
        return _interp(z, [160, 350, 650], [25, 19, 15])

    def ry(self, z: F32) -> F32:
        """Vertebral-body half-depth (mm) at template z."""
        return _interp(z, [160, 350, 650], [18, 15, 13])


@dataclass(frozen=True)
class _Patient:
    scale: float
    profile: _Profile
    spine: _Spine
    organs: dict[str, _Organ]
    hu: dict[str, float]
    rib_drop: float
    visceral_fat: float  # threshold on the "fat" field; lower = more fat
    noise: _NoiseBank


def _interp(z: F32 | float, xp, fp) -> F32:
    """np.interp returning float32 (keeps the 3D arithmetic in float32)."""
    return np.asarray(np.interp(z, xp, fp), dtype=np.float32)


def _rotation(yaw_deg: float, tilt_deg: float) -> tuple[tuple[float, float, float], ...]:
    """Rows = local axes of a frame rotated by yaw (about z) then tilt (about y)."""
    c, s = np.cos(np.radians(yaw_deg)), np.sin(np.radians(yaw_deg))
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    c, s = np.cos(np.radians(tilt_deg)), np.sin(np.radians(tilt_deg))
    ry = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return tuple(tuple(map(float, r)) for r in (rz @ ry).T)


def _draw_patient(seed: np.random.SeedSequence) -> _Patient:
    """Draw all anatomical parameters of one virtual patient."""
    field_seed, param_seed = seed.spawn(2)
    rng = np.random.default_rng(param_seed)
    scale = rng.uniform(0.9, 1.1)
    width, depth = rng.uniform(0.9, 1.12), rng.uniform(0.88, 1.15)
    n = len(_PROFILE_Z)
    profile = _Profile(
        a=tuple(_PROFILE_A * width * (1 + 0.03 * rng.standard_normal(n))),
        b_ant=tuple(_PROFILE_B_ANT * depth * (1 + 0.03 * rng.standard_normal(n))),
        b_post=tuple(_PROFILE_B_POST * depth * (1 + 0.03 * rng.standard_normal(n))),
        fat=rng.uniform(10, 30) / scale,
        belly=rng.uniform(0.9, 1.8),
        muscle=rng.uniform(10, 18) / scale,
    )
    fattiness = (profile.fat * scale - 10) / 20  # 0 (lean) .. 1
    return _Patient(
        scale=scale,
        profile=profile,
        spine=_draw_spine(rng, depth),
        organs=_draw_organs(rng, width, depth),
        hu=_draw_hu(rng),
        rib_drop=rng.uniform(50, 80),
        visceral_fat=float(0.4 - 1.2 * fattiness + 0.2 * rng.standard_normal()),
        noise=_NoiseBank(field_seed),
    )


def _draw_spine(rng: np.random.Generator, depth: float) -> _Spine:
    """Spine curvature, scoliosis and vertebral levels (z ranges of L5 .. T1)."""
    s1_top = rng.uniform(150, 168)
    lo, hi, z = [], [], s1_top
    for k in range(17):  # L5 .. L1, T12 .. T1
        if k < 5:
            disc, body = rng.uniform(8, 11), rng.uniform(26, 31)
        else:
            disc = rng.uniform(4.5, 6.5)
            body = np.interp(k, [5, 16], [22, 17]) * rng.uniform(0.94, 1.06)
        z += disc
        lo.append(float(z))
        z += body
        hi.append(float(z))
    y_ctrl = (_SPINE_Y + rng.normal(0, 4, _SPINE_Y.size)) * depth
    return _Spine(y_ctrl=tuple(y_ctrl), lateral_amp=rng.uniform(0, 6),
                  lateral_phase=rng.uniform(0, 2 * np.pi), sacrum_lo=rng.uniform(10, 30),
                  s1_top=s1_top, body_lo=tuple(lo), body_hi=tuple(hi))


def _draw_organs(rng: np.random.Generator, width: float, depth: float) -> dict[str, _Organ]:
    """Organ ellipsoids with random size (+-15%), shift (+-12 mm) and rotation."""
    draws: dict[str, tuple[float, npt.NDArray]] = {}  # name -> (size factor, shift)
    kidney_dz = rng.uniform(-10, 10)
    organs = {}
    for name, (center, semi, yaw, tilt) in _ORGANS.items():
        if name in _ORGAN_GROUPS:
            size, shift = draws[_ORGAN_GROUPS[name]]
        else:
            size = rng.uniform(0.85, 1.15)
            shift = rng.uniform(-12, 12, 3)
            if name.startswith("kidney"):
                shift[2] = kidney_dz + rng.uniform(-4, 4)
        draws[name] = (size, shift)
        c = np.array(center, float) * (width, depth, 1) + shift
        s = np.array(semi, float) * size * (1 + rng.uniform(-0.06, 0.06, 3))
        rot = _rotation(yaw + rng.uniform(-8, 8), tilt + rng.uniform(-4, 4))
        organs[name] = _Organ(tuple(map(float, c)), tuple(map(float, s)), rot)
    return organs


def _draw_hu(rng: np.random.Generator) -> dict[str, float]:
    """Tissue intensities (HU) that vary with contrast timing / bone density."""
    return {
        "liver": rng.uniform(50, 70),
        "spleen": rng.uniform(42, 58),
        "kidney_cortex": rng.uniform(120, 180),
        "kidney_medulla": rng.uniform(25, 40),
        "aorta": rng.uniform(160, 220),
        "vein": rng.uniform(90, 140),
        "bone": rng.uniform(380, 480),
        "lung": rng.uniform(-880, -830),
    }


# ---------------------------------------------------------------------------
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


def _inplane_extent(pat: _Patient, z0: float, z1: float) -> tuple[npt.NDArray, npt.NDArray]:
    """Body bounding box in x/y (body mm) over the z window [z0, z1] (body mm)."""
    z = np.linspace(z0, z1, 64) / pat.scale
    a, ba, bp = pat.profile.skin_axes(z.astype(np.float32))
    lo = -np.array([a.max(), ba.max()]) * pat.scale
    hi = np.array([a.max(), bp.max()]) * pat.scale
    return lo, hi


# ---------------------------------------------------------------------------
# Canvas: the voxel grid being painted
# ---------------------------------------------------------------------------
@dataclass
class _Region:
    """Axis-aligned sub-box of the canvas with broadcastable template coordinates."""

    sl: tuple[slice, slice, slice]
    x: F32  # (1, 1, nx)
    y: F32  # (1, ny, 1)
    z: F32  # (nz, 1, 1)


class _Canvas:
    """Template-space voxel grid holding HU (float32) and labels (uint8), [z, y, x]."""

    def __init__(self, acq: _Acquisition, pat: _Patient) -> None:
        nx, ny, nz = acq.size
        axes = [(acq.lo[i] + np.arange(n) * acq.spacing[i]) / pat.scale
                for i, n in enumerate((nx, ny, nz))]
        self.x, self.y, self.z = (a.astype(np.float32) for a in axes)
        self.hu = np.full((nz, ny, nx), -1000.0, np.float32)
        self.labels = np.zeros((nz, ny, nx), np.uint8)
        self.cavity = np.zeros((nz, ny, nx), bool)
        self.noise = pat.noise
        self._fields: dict[str, F32] = {}

    def region(self, lo: tuple[float, float, float] = (-np.inf,) * 3,
               hi: tuple[float, float, float] = (np.inf,) * 3) -> _Region | None:
        """Sub-box covering template bounds [lo, hi] (x, y, z), None if empty."""
        sl = []
        for axis, a, b in zip((self.x, self.y, self.z), lo, hi):
            i0, i1 = np.searchsorted(axis, a, "left"), np.searchsorted(axis, b, "right")
            if i1 <= i0:
                return None
            sl.append(slice(int(i0), int(i1)))
        sx, sy, sz = sl
        return _Region((sz, sy, sx), self.x[sx][None, None, :],
                       self.y[sy][None, :, None], self.z[sz][:, None, None])

    def field(self, name: str, reg: _Region) -> F32:
        """Random field ``name`` on a region (sampled once for the whole grid)."""
        if name not in self._fields:
            self._fields[name] = self.noise.sample(name, self.x, self.y, self.z)
        return self._fields[name][reg.sl]

    def paint(self, reg: _Region, mask: npt.NDArray[np.bool_], hu: float | F32,
              label: int | None = None) -> None:
        """Set HU (scalar or array) and optionally the label where ``mask``."""
        np.copyto(self.hu[reg.sl], hu, where=mask)
        if label is not None:
            np.copyto(self.labels[reg.sl], np.uint8(label), where=mask)


def _ellipse_q(reg: _Region, a: F32, b_ant: F32, b_post: F32) -> F32:
    """Normalised squared radius of an axial ellipse, different depth front/back."""
    inv_b2 = np.where(reg.y < 0, 1.0 / b_ant**2, 1.0 / b_post**2)
    return reg.x**2 / a**2 + reg.y**2 * inv_b2


def _segment_d2(reg: _Region, p0: tuple[float, ...], p1: tuple[float, ...]) -> F32:
    """Squared distance (mm^2) from each voxel to the segment p0-p1."""
    p0a, d = np.array(p0, float), np.array(p1, float) - np.array(p0, float)
    rel = (reg.x - float(p0a[0]), reg.y - float(p0a[1]), reg.z - float(p0a[2]))
    w = d / max(float(d @ d), 1e-9)
    t = rel[0] * float(w[0]) + rel[1] * float(w[1]) + rel[2] * float(w[2])
    np.clip(t, 0, 1, out=t)
    return sum((r - t * float(di)) ** 2 for r, di in zip(rel, d))


def _capsule(canvas: _Canvas, p0: tuple[float, ...], p1: tuple[float, ...], r: float
             ) -> tuple[_Region, F32] | None:
    """Region around a capsule of radius r and the squared distance to its axis."""
    lo = tuple(min(a, b) - r for a, b in zip(p0, p1))
    hi = tuple(max(a, b) + r for a, b in zip(p0, p1))
    reg = canvas.region(lo, hi)
    return None if reg is None else (reg, _segment_d2(reg, p0, p1))


def _organ_mask(canvas: _Canvas, organ: _Organ, wobble: float = 0.12
                ) -> tuple[_Region, npt.NDArray[np.bool_], F32] | None:
    """Region, mask and q of an organ, with a smooth random shape perturbation."""
    reg = canvas.region(*organ.bounds())
    if reg is None:
        return None
    q = organ.q(reg)
    qw = q + wobble * canvas.field("shape", reg)
    return reg, (qw <= 1.0) & canvas.cavity[reg.sl], q


# ---------------------------------------------------------------------------
# Painters, in painting order (later ones overwrite earlier ones)
# ---------------------------------------------------------------------------
def _paint_body(c: _Canvas, pat: _Patient) -> None:
    """Skin/fat, muscle wall and cavity; the cavity mask is stored on the canvas."""
    reg = c.region()
    prof, tex = pat.profile, c.field("tex", reg)
    skin = _ellipse_q(reg, *prof.skin_axes(reg.z)) <= 1
    c.paint(reg, skin, -100 + 10 * tex)
    muscle = _ellipse_q(reg, *prof.muscle_axes(reg.z)) <= 1
    c.paint(reg, muscle, 50 + 8 * tex)
    c.cavity[...] = _ellipse_q(reg, *prof.cavity_axes(reg.z)) <= 1
    # Chest: mediastinal fat (the lungs and heart fill most of it later).
    c.paint(reg, c.cavity & (reg.z > 440), -80 + 15 * tex)


def _paint_abdomen(c: _Canvas, pat: _Patient) -> None:
    """Abdominal/pelvic cavity: bowel loops, gas, mesenteric and retroperitoneal fat."""
    reg = c.region(hi=(np.inf, np.inf, 440.0))
    if reg is None:
        return
    tex, bowel, shape = c.field("tex", reg), c.field("bowel", reg), c.field("shape", reg)
    # Bowel loops are the blobs of one smooth field (wall, then fluid or gas
    # inside); between them mesenteric fat or soft tissue.
    hu = np.where(c.field("fat", reg) > pat.visceral_fat, np.float32(-95), np.float32(35))
    hu = np.where(bowel > 0.1, np.float32(60), hu)
    lumen = bowel > 0.35
    hu = np.where(lumen, np.float32(15), hu)
    hu = np.where(lumen & (c.field("gas", reg) > 0.8), np.float32(-980), hu)
    hu += 8 * tex
    # Retroperitoneum (around the spine, sweeping back laterally): fat, no bowel.
    border = pat.spine.y(reg.z) - 40 + 0.003 * reg.x**2 + 10 * shape
    hu = np.where((reg.y > border) & (reg.z > 120), -90 + 10 * tex, hu)
    c.paint(reg, c.cavity[reg.sl], hu)


def _paint_colon(c: _Canvas, pat: _Patient) -> None:
    """Ascending, transverse and descending colon and rectum with mottled stool/gas."""
    o = pat.organs
    xr, xl = o["liver"].center[0] - 40, o["spleen"].center[0] + 10
    ys = float(pat.spine.y(np.float32(80.0)))
    segments = [((xr, -5, 150), (xr, -5, 320), 22), ((xr, -30, 330), (xl, -30, 345), 20),
                ((xl, 12, 180), (xl, 12, 355), 20), ((0, ys - 38, 20), (0, ys - 30, 140), 17)]
    for i, (p0, p1, r) in enumerate(segments):
        cap = _capsule(c, p0, p1, r)
        if cap is None:
            continue
        reg, d2 = cap
        gas = c.field("gas", reg) > (0.8 if i == 3 else -0.1)  # rectum: little gas
        inner = np.where(gas, np.float32(-950), 20 + 25 * c.field("tex", reg))
        c.paint(reg, (d2 <= r * r) & c.cavity[reg.sl], 45)
        c.paint(reg, (d2 <= (r - 3) ** 2) & c.cavity[reg.sl], inner)


def _paint_lungs(c: _Canvas, pat: _Patient) -> None:
    """Lungs with gravity gradient and vessels, then trachea and main bronchi."""
    for name, side in (("lung_right", -1), ("lung_left", 1)):
        organ = pat.organs[name]
        got = _organ_mask(c, organ, wobble=0.08)
        if got is None:
            continue
        reg, mask, _ = got
        mask &= side * reg.x > 6  # mediastinum
        hu = pat.hu["lung"] + 0.5 * (reg.y - organ.center[1]) + 12 * c.field("tex", reg)
        # Vessels: where two smooth fields are both near zero (curves in 3D),
        # thicker towards the hilum.
        hilum = (side * 45.0, 5.0, 520.0)
        d2 = (reg.x - hilum[0]) ** 2 + (reg.y - hilum[1]) ** 2 + (reg.z - hilum[2]) ** 2
        width = 0.12 + 0.22 * np.exp(d2 / (-2 * 50.0**2))
        vessel = ((np.abs(c.field("vessel_a", reg)) < width)
                  & (np.abs(c.field("vessel_b", reg)) < width))
        hu = np.where(vessel, np.float32(40), hu)
        c.paint(reg, mask, hu, ORGAN_LABELS[name])
    y_tr = float(pat.spine.y(np.float32(600.0))) - 38
    for p0, p1, r in (((0, y_tr, 560), (0, y_tr, 720), 9.0),
                      ((0, y_tr, 562), (-45, y_tr + 10, 525), 6.5),
                      ((0, y_tr, 562), (45, y_tr + 10, 525), 6.0)):
        cap = _capsule(c, p0, p1, r)
        if cap is not None:
            reg, d2 = cap
            c.paint(reg, (d2 <= (r + 1.5) ** 2) & c.cavity[reg.sl], 40, _UNLABELLED)
            c.paint(reg, d2 <= r * r, -990)


def _paint_heart(c: _Canvas, pat: _Patient) -> None:
    """Heart: pericardial fat, myocardium and contrast-filled chambers."""
    got = _organ_mask(c, pat.organs["heart"], wobble=0.05)
    if got is None:
        return
    reg, mask, q = got
    c.paint(reg, (q <= 1.25) & c.cavity[reg.sl], -90, _UNLABELLED)
    c.paint(reg, mask, 45)
    c.paint(reg, mask & (q < 0.5), pat.hu["aorta"] - 30)


def _paint_stomach(c: _Canvas, pat: _Patient) -> None:
    """Stomach with wall, fluid and an anterior air pocket (patient supine)."""
    organ = pat.organs["stomach"]
    got = _organ_mask(c, organ)
    if got is None:
        return
    reg, mask, q = got
    c.paint(reg, mask, 50, _UNLABELLED)
    inner = mask & (q < 0.8)
    c.paint(reg, inner, 15)
    c.paint(reg, inner & (reg.y < organ.center[1] - 0.2 * organ.semi[1]), -990)


def _paint_muscles(c: _Canvas, pat: _Patient) -> None:
    """Gluteal, psoas and erector spinae muscles."""
    sp = pat.spine
    for side in (-1, 1):
        glut = _Organ((side * 85.0, 55.0, 95.0), (62.0, 45.0, 95.0), _rotation(side * 20, 0))
        got = _organ_mask(c, glut, wobble=0.1)
        if got is not None:
            c.paint(got[0], got[1], 50 + 6 * c.field("tex", got[0]), _UNLABELLED)
    reg = c.region((-130, -np.inf, 100), (130, np.inf, 650))
    if reg is None:
        return
    ys, z = sp.y(reg.z), reg.z
    for side in (-1, 1):
        # Psoas: from L1 (close to the vertebrae) down and out to the pelvic brim.
        px = side * _interp(z, [110, 340], [62, 28])
        py = ys + _interp(z, [110, 340], [-22, 0])
        pr = _interp(z, [100, 110, 220, 340, 350], [0, 18, 24, 10, 0])
        psoas = (reg.x - px) ** 2 + (reg.y - py) ** 2 <= pr**2
        c.paint(reg, psoas, 50 + 6 * c.field("tex", reg), _UNLABELLED)
        ex, ey = side * _interp(z, [200, 500], [40, 33]), ys + sp.ry(z) + 36
        erector = (((reg.x - ex) / _interp(z, [200, 500], [30, 22])) ** 2
                   + ((reg.y - ey) / _interp(z, [200, 500], [24, 17])) ** 2) <= 1
        c.paint(reg, erector, 50 + 6 * c.field("tex", reg), _UNLABELLED)


def _paint_solid_organs(c: _Canvas, pat: _Patient) -> None:
    """Liver (both lobes, with portal vessels), spleen, kidneys and bladder."""
    for name in ("kidney_right", "kidney_left"):  # perirenal fat first
        o = pat.organs[name]
        fat = _Organ(o.center, tuple(s * 1.3 + 6 for s in o.semi), o.rot)
        got = _organ_mask(c, fat)
        if got is not None:
            c.paint(got[0], got[1], -95, _UNLABELLED)
    for name in ("liver", "liver_left_lobe"):
        got = _organ_mask(c, pat.organs[name])
        if got is not None:
            reg, mask, _ = got
            vessel = ((np.abs(c.field("vessel_a", reg)) < 0.12)
                      & (np.abs(c.field("vessel_b", reg)) < 0.12))
            hu = np.where(vessel, np.float32(pat.hu["vein"]),
                          pat.hu["liver"] + 6 * c.field("tex", reg))
            c.paint(reg, mask, hu, ORGAN_LABELS["liver"])
    got = _organ_mask(c, pat.organs["spleen"])
    if got is not None:
        c.paint(got[0], got[1], pat.hu["spleen"] + 6 * c.field("tex", got[0]),
                ORGAN_LABELS["spleen"])
    for name in ("kidney_right", "kidney_left"):
        got = _organ_mask(c, pat.organs[name], wobble=0.06)
        if got is not None:
            reg, mask, q = got
            hu = np.where(q < 0.5, np.float32(pat.hu["kidney_medulla"]),
                          np.float32(pat.hu["kidney_cortex"]))
            c.paint(reg, mask, hu + 6 * c.field("tex", reg), ORGAN_LABELS[name])
    got = _organ_mask(c, pat.organs["bladder"], wobble=0.06)
    if got is not None:
        c.paint(got[0], got[1], 10 + 4 * c.field("tex", got[0]), ORGAN_LABELS["bladder"])


def _paint_vessels(c: _Canvas, pat: _Patient) -> None:
    """Aorta (labelled) with arch and iliac arteries, and the inferior vena cava."""
    sp = pat.spine
    zs = np.array([175, 300, 380, 450, 560], np.float32)
    ant = sp.y(zs) - sp.ry(zs)  # anterior surface of the vertebral bodies
    ax = np.array([6, 12, 15, 22, 24], np.float32) + sp.x(zs)
    ay = ant + np.array([-12, -12, -10, 0, 8], np.float32)
    reg = c.region((-60, -np.inf, 130), (60, np.inf, 565))
    if reg is not None:
        z = reg.z
        d2 = (reg.x - _interp(z, zs, ax)) ** 2 + (reg.y - _interp(z, zs, ay)) ** 2
        ivc_x, ivc_y = _interp(z, zs, ax - 34), _interp(z, zs, ay + 2)
        ivc = ((reg.x - ivc_x) ** 2 + (reg.y - ivc_y) ** 2 <= 11**2) & (z > 140) & (z < 470)
        c.paint(reg, ivc, pat.hu["vein"], _UNLABELLED)
        aorta = (d2 <= _interp(z, [175, 560], [9.5, 12.5]) ** 2) & (z >= 175) & (z <= 560)
        c.paint(reg, aorta, pat.hu["aorta"], ORGAN_LABELS["aorta"])
    asc = (float(ax[-1]) - 18.0, float(ant[-1]) - 62.0)
    _paint_arch(c, pat, (float(ax[-1]), float(ay[-1])), asc)
    for side in (-1, 1):  # common and external iliac arteries
        knee = (side * 45.0, float(ay[0]) - 5, 105.0)
        for p0, p1 in (((float(ax[0]), float(ay[0]), 178.0), knee),
                       (knee, (side * 80.0, float(ay[0]) - 30, 30.0))):
            cap = _capsule(c, p0, p1, 6.0)
            if cap is not None:
                c.paint(cap[0], cap[1] <= 36.0, pat.hu["aorta"], _UNLABELLED)


def _paint_arch(c: _Canvas, pat: _Patient, desc: tuple[float, float],
                asc: tuple[float, float]) -> None:
    """Aortic arch (half torus over z = 560) and ascending aorta down to the heart."""
    z_top, r = 560.0, 13.0
    cap = _capsule(c, (*asc, 485.0), (*asc, z_top), r)
    if cap is not None:
        c.paint(cap[0], cap[1] <= r * r, pat.hu["aorta"], ORGAN_LABELS["aorta"])
    mid = np.array([(desc[0] + asc[0]) / 2, (desc[1] + asc[1]) / 2])
    u = np.array(desc) - np.array(asc)
    big_r = float(np.linalg.norm(u)) / 2
    u /= np.linalg.norm(u)
    reg = c.region((float(mid[0]) - big_r - r, float(mid[1]) - big_r - r, z_top),
                   (float(mid[0]) + big_r + r, float(mid[1]) + big_r + r, z_top + big_r + r))
    if reg is None:
        return
    s = (reg.x - float(mid[0])) * float(u[0]) + (reg.y - float(mid[1])) * float(u[1])
    v = (reg.x - float(mid[0])) * float(-u[1]) + (reg.y - float(mid[1])) * float(u[0])
    dz = reg.z - z_top
    torus = (np.sqrt(s * s + dz * dz) - big_r) ** 2 + v * v <= r * r
    c.paint(reg, torus, pat.hu["aorta"], ORGAN_LABELS["aorta"])


def _paint_spine(c: _Canvas, pat: _Patient) -> None:
    """Sacrum and vertebrae (bodies with cortex, arches, processes), discs, canal."""
    sp = pat.spine
    ymin, ymax = min(sp.y_ctrl) - 30, max(sp.y_ctrl) + 75
    reg = c.region((-60, ymin, sp.sacrum_lo), (60, ymax, np.inf))
    if reg is None:
        return
    z = reg.z
    xc, yc, rx, ry = sp.x(z), sp.y(z), sp.rx(z), sp.ry(z)
    lo, hi = np.array(sp.body_lo), np.array(sp.body_hi)
    k = np.clip(np.searchsorted(hi, z), 0, len(hi) - 1)
    in_body = (z >= lo[k]) & (z <= hi[k])
    t = np.clip((z - lo[k]) / (hi[k] - lo[k]), 0, 1)
    end_dist = np.minimum(z - lo[k], hi[k] - z)  # to the nearest endplate, mm
    lumbar = k < sp.n_lumbar
    in_sacrum = z < sp.s1_top
    in_disc = ~in_body & ~in_sacrum

    # Sacrum: wide and flat, tapering down to the coccyx.
    srx = _interp(z, [sp.sacrum_lo, sp.s1_top], [12, 50])
    sry = _interp(z, [sp.sacrum_lo, sp.s1_top], [9, 18])
    rx, ry = np.where(in_sacrum, srx, rx), np.where(in_sacrum, sry, ry)
    q = ((reg.x - xc) / rx) ** 2 + ((reg.y - yc) / ry) ** 2
    bone = pat.hu["bone"] + 30 * c.field("tex", reg)
    body = (q <= 1) & (in_body | in_sacrum)
    rim = (q >= (1 - 2.5 / ry) ** 2) | ((end_dist < 1.5) & in_body)
    c.paint(reg, body, np.where(rim, np.float32(900), bone), ORGAN_LABELS["spine"])
    c.paint(reg, (q <= 1) & in_disc, 85, _UNLABELLED)

    # Posterior elements around the spinal canal.
    r_can = np.where(lumbar, np.float32(9), np.float32(7.5))
    cy = yc + ry + r_can + 2
    dc2 = (reg.x - xc) ** 2 + (reg.y - cy) ** 2
    arch = (dc2 <= (r_can + 5) ** 2) & (reg.y >= yc + ry - 4) & in_body & (t > 0.1) & (t < 0.9)
    spin_len = np.where(lumbar, np.float32(28), np.float32(17))
    spinous = ((np.abs(reg.x - xc) <= 3.5) & (reg.y >= cy) & (reg.y <= cy + r_can + 3 + spin_len)
               & in_body & (t > 0.2) & (t < 0.85))
    tp_y = np.where(lumbar, cy - 3, cy + 4)
    tp_w = np.where(lumbar, np.float32(45), np.float32(32))
    transverse = ((np.abs(reg.y - tp_y) <= 4.5) & (np.abs(reg.x - xc) <= tp_w) & in_body
                  & (t > 0.35) & (t < 0.72))
    c.paint(reg, arch | spinous | transverse, np.float32(650) + 30 * c.field("tex", reg),
            ORGAN_LABELS["spine"])
    canal = (dc2 <= r_can**2) & (reg.y >= yc + ry) & ~in_sacrum
    c.paint(reg, canal, 25, _UNLABELLED)


# Ribs T12 .. T1: how far round they reach (rad from the back), bone then cartilage.
_RIB_END = np.array([1.3, 1.7, 2.2, 2.35, 2.5, 2.6, 2.65, 2.7, 2.7, 2.65, 2.6, 2.5])
_CARTILAGE_END = np.array([1.3, 1.7, 2.6, 2.7, 2.8, 2.95, 2.95, 2.95, 2.95, 2.95, 2.95, 2.9])
_RIB_START = 0.3


def _paint_ribs(c: _Canvas, pat: _Patient) -> None:
    """Twelve pairs of ribs hugging the cavity wall, sloping down anteriorly."""
    sp = pat.spine
    z_post = (np.array(sp.body_lo[sp.n_lumbar:]) + np.array(sp.body_hi[sp.n_lumbar:])) / 2
    reg = c.region((-np.inf, -np.inf, z_post[0] - pat.rib_drop - 10),
                   (np.inf, np.inf, z_post[-1] + 10))
    if reg is None:
        return
    theta = np.arctan2(np.abs(reg.x), reg.y)  # 0 at the back, pi at the front
    r = np.sqrt(reg.x**2 + reg.y**2)
    # Radial distance (mm) outside the cavity boundary, approximately.
    rho = np.sqrt(_ellipse_q(reg, *pat.profile.cavity_axes(reg.z)))
    d = r * (1 - 1 / np.maximum(rho, 1e-3))
    g = np.clip((theta - _RIB_START) / (np.pi - _RIB_START), 0, 1) ** 1.3
    z_flat = reg.z + pat.rib_drop * g  # undo the anterior slope
    k = np.clip(np.rint(np.interp(z_flat, z_post, np.arange(z_post.size))), 0, z_post.size - 1)
    k = k.astype(np.intp)
    dz = z_flat - z_post[k].astype(np.float32)
    tube = (dz / 5.5) ** 2 + ((d - 1.0) / 4.0) ** 2 <= 1
    started = theta >= _RIB_START
    bone = tube & started & (theta <= _RIB_END[k])
    cartilage = tube & (theta > _RIB_END[k]) & (theta <= _CARTILAGE_END[k])
    c.paint(reg, cartilage, 120, _UNLABELLED)
    c.paint(reg, bone, 650 + 40 * c.field("tex", reg), _UNLABELLED)
    _paint_sternum(c, pat)
    _paint_scapulae(c, pat)


def _paint_sternum(c: _Canvas, pat: _Patient) -> None:
    """Sternum in the anterior chest wall, widening into the manubrium at the top."""
    reg = c.region((-30, -np.inf, 440), (30, 0, 610))
    if reg is None:
        return
    _, ba, _ = pat.profile.cavity_axes(reg.z)
    half_w = _interp(reg.z, [440, 570, 590, 610], [8, 14, 24, 24])
    sternum = (np.abs(reg.x) <= half_w) & (np.abs(reg.y + ba + 4) <= 6)
    c.paint(reg, sternum, 420, _UNLABELLED)


def _paint_scapulae(c: _Canvas, pat: _Patient) -> None:
    """Shoulder blades: thin curved plates in the posterior chest wall."""
    reg = c.region((-135, 0, 470), (135, np.inf, 625))
    if reg is None:
        return
    _, _, bp = pat.profile.muscle_axes(reg.z)
    ax = np.abs(reg.x)
    y_plate = bp - 14 - 0.005 * (ax - 85) ** 2
    half_w = 40 * np.clip((reg.z - 470) / 60, 0.25, 1)
    plate = (np.abs(reg.y - y_plate) <= 3.5) & (np.abs(ax - 85) <= half_w)
    c.paint(reg, plate, 500, _UNLABELLED)


def _paint_pelvis(c: _Canvas, pat: _Patient) -> None:
    """Iliac wings, acetabula, femoral heads/necks/shafts, pubic and ischial rami."""
    reg = c.region((-160, -np.inf, -np.inf), (160, np.inf, 225))
    if reg is None:
        return
    z = reg.z
    zc = [95.0, 150.0, 215.0]
    r = _interp(z, zc, [30, 70, 95])
    half_t = _interp(z, zc, [7, 5, 4])
    in_z = (z >= 95) & (z <= 212)
    for side in (-1, 1):
        cx, cy = side * _interp(z, zc, [85, 55, 40]), _interp(z, zc, [-10, -15, -20])
        dx, dy = side * (reg.x - cx), reg.y - cy
        phi = np.arctan2(dx, dy)  # 0 towards the back, growing laterally
        wing = (np.abs(np.sqrt(dx * dx + dy * dy) - r) <= half_t) & (phi > 0.1) & (phi < 2.0)
        c.paint(reg, wing & in_z, 520 + 40 * c.field("tex", reg), _UNLABELLED)
    for side in (-1, 1):
        head = (side * 88.0, -12.0, 65.0)
        troch = (side * 122.0, -5.0, 50.0)
        caps = [((side * 88.0, -12.0, 66.0), (side * 88.0, -12.0, 64.0), 32.0, 26.0),  # acetabulum
                (head, head, 23.0, 0.0),
                (head, troch, 14.0, 0.0),
                (troch, (side * 112.0, 0.0, -80.0), 14.0, 0.0),
                ((side * 75.0, -35.0, 62.0), (side * 12.0, -72.0, 50.0), 9.0, 0.0),
                ((side * 80.0, 5.0, 55.0), (side * 55.0, 30.0, 15.0), 12.0, 0.0)]
        for p0, p1, rad, hole in caps:
            cap = _capsule(c, p0, p1, rad)
            if cap is None:
                continue
            creg, d2 = cap
            mask = (d2 <= rad * rad) & (d2 > hole * hole)
            if hole:  # acetabular roof: only the upper, medial half of the shell
                mask &= (creg.z > 55) & (side * creg.x < side * p0[0] + 8)
            c.paint(creg, mask, 520 + 40 * c.field("tex", creg), _UNLABELLED)


_PAINTERS = (_paint_body, _paint_abdomen, _paint_colon, _paint_lungs, _paint_heart,
             _paint_stomach, _paint_muscles, _paint_solid_organs, _paint_vessels,
             _paint_pelvis, _paint_spine, _paint_ribs)


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


def _draw_case(seed: int) -> tuple[_Patient, _Acquisition, np.random.Generator]:
    """The patient and acquisition of phantom ``seed``, and the scan generator (left where the acquisition draw
    ends, so the scanner noise that follows stays the same)."""
    anatomy_seed, scan_seed = np.random.SeedSequence(seed).spawn(2)
    pat = _draw_patient(anatomy_seed)
    rng = np.random.default_rng(scan_seed)
    return pat, _draw_acquisition(rng, pat), rng


def make_phantom(seed: int) -> tuple[sitk.Image, sitk.Image]:
    """Generate one synthetic CT scan and its organ labels.

    Args:
        seed: non-negative integer; the same seed always gives the same output.

    Returns:
        ``(ct, labels)`` on the same grid (size, spacing, origin, direction).
        ``ct``: int16 Hounsfield units (air -1000, fat ~-100, soft tissue 30-60,
        contrast-enhanced aorta ~180, bone 400-900). ``labels``: uint8 with the
        values of ``ORGAN_LABELS`` for organs inside the field of view, 0
        elsewhere. Spacing (x, y, z) is 1.5-3.0 mm in-plane and 2-5 mm between
        slices; direction is identity or diag(-1, -1, 1); at most
        ``MAX_VOXELS`` voxels. As numpy arrays (``GetArrayFromImage``) both
        are indexed [z, y, x].
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    pat, acq, rng = _draw_case(seed)
    canvas = _Canvas(acq, pat)
    for paint in _PAINTERS:
        paint(canvas, pat)
    ct = _scan(canvas.hu, acq, rng)
    return _to_image(ct, acq), _to_image(canvas.labels, acq)


def anatomical_z(cohort_seed: int, index: int) -> np.ndarray:
    """Ground truth for position models: the anatomical height (template mm: pelvis 0, lung apex ~650, the same
    anatomy at the same value in every patient) of each axial slice of case ``index`` of the cohort written by
    ``write_cohort(..., seed=cohort_seed)``, in canonical order (inferior to superior), shape ``(nz,)``."""
    pat, acq, _ = _draw_case(_case_seed(cohort_seed, index))
    return (acq.lo[2] + np.arange(acq.size[2]) * acq.spacing[2]) / pat.scale


# ---------------------------------------------------------------------------
# Cohort writer
# ---------------------------------------------------------------------------
def _case_seed(cohort_seed: int, index: int) -> int:
    """Seed of case ``index`` in a cohort; distinct cohorts do not share cases."""
    return int(np.random.SeedSequence([cohort_seed, index]).generate_state(1)[0])


def _dataset_json(n_cases: int, cohort_seed: int) -> dict:
    """nnU-Net v2 dataset.json content."""
    return {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **ORGAN_LABELS},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
        "name": "SyntheticCTPhantoms",
        "description": f"Synthetic CT phantoms from nnunet_ape.phantoms, cohort seed {cohort_seed}",
    }


def write_cohort(out_dir: str | Path, n_cases: int, seed: int = 0) -> list[Path]:
    """Write ``n_cases`` phantoms as an nnU-Net v2 raw dataset.

    Layout: ``out_dir/imagesTr/phantom_XXX_0000.nii.gz``,
    ``out_dir/labelsTr/phantom_XXX.nii.gz`` and ``out_dir/dataset.json``.
    Everything is written to a temporary sibling folder that is renamed to
    ``out_dir`` at the end, so a failure leaves no partial output.

    Args:
        out_dir: target folder; must not exist or be empty.
        n_cases: number of cases (>= 1).
        seed: cohort seed; case i uses a seed derived from (seed, i).

    Returns:
        Paths of the written images (inside ``out_dir``), in case order.

    Raises:
        FileExistsError: if ``out_dir`` exists and is not empty.
        ValueError: if ``n_cases`` < 1.
    """
    out_dir = Path(out_dir)
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"refusing to write into non-empty folder {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        names = _write_cases(tmp, n_cases, seed)
        (tmp / "dataset.json").write_text(json.dumps(_dataset_json(n_cases, seed), indent=2))
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out_dir / "imagesTr" / f"{name}_0000.nii.gz" for name in names]


def _write_cases(root: Path, n_cases: int, seed: int) -> list[str]:
    """Write images and labels into ``root``; returns the case identifiers."""
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    names = []
    for i in range(n_cases):
        name = f"phantom_{i:03d}"
        ct, labels = make_phantom(_case_seed(seed, i))
        sitk.WriteImage(ct, str(root / "imagesTr" / f"{name}_0000.nii.gz"), True)
        sitk.WriteImage(labels, str(root / "labelsTr" / f"{name}.nii.gz"), True)
        names.append(name)
    return names
