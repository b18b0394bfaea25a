"""One virtual patient drawn from the template: body profile, spine, organs and tissue intensities (HU)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from nnunet_ape.phantoms.template import (_ORGAN_GROUPS, _ORGANS, _PROFILE_A, _PROFILE_B_ANT, _PROFILE_B_POST, _PROFILE_Z,
                                          _SPINE_Y, _SPINE_Z, F32, Bounds, _NoiseBank, _Region)


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
