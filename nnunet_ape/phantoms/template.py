"""Template anatomy of the phantoms: organ labels, image-size limits, the average patient's body profile,
spine and organs (mm), and the smooth random fields (``_NoiseBank``) that vary each patient's shapes and texture."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import ndimage

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


@dataclass
class _Region:
    """Axis-aligned sub-box of the canvas with broadcastable template coordinates."""

    sl: tuple[slice, slice, slice]
    x: F32  # (1, 1, nx)
    y: F32  # (1, ny, 1)
    z: F32  # (nz, 1, 1)
