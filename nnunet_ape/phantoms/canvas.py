"""The voxel canvas a phantom is painted on, and the implicit shapes painters fill (ellipses, capsules, organs)."""

from __future__ import annotations


import numpy as np
import numpy.typing as npt

from nnunet_ape.phantoms.patient import _Organ, _Patient
from nnunet_ape.phantoms.scanner import _Acquisition
from nnunet_ape.phantoms.template import F32, _Region



# ---------------------------------------------------------------------------
# Canvas: the voxel grid being painted
# ---------------------------------------------------------------------------
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
