"""Whole-volume APE maps: resample to the model's spacing, sliding windows with Gaussian blending, map back.

The network runs on the CT in canonical order (:mod:`nnunet_ape.canonical`); :func:`canonical_map` resamples its
output onto the canonical CT's voxels (what localization searches), :func:`map_on_grid` onto the CT's own grid (what
``embed`` writes and the APE channels hold).

The map is a smooth function of position: windows overlap and are blended with Gaussian weights (as nnU-Net
does), and the network's BatchNorm runs with fixed statistics, so there are no seams at window borders.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from nnunet_ape.canonical import CanonicalCT, canonical_ct
from nnunet_ape.io import Volume, from_canonical, to_canonical
from nnunet_ape.resample import resample_grid, resample_spacing


@dataclass
class EmbedSettings:
    """How to run a model over a whole CT.

    spacing: mm (x, y, z) the CT is resampled to before the network. patch_size: window in voxels at that
    spacing. overlap: fraction of a window shared with its neighbour. stride: 1 for a full-resolution map, 4 for
    a map sampled at every 4th input voxel (for storage). half: return float16.
    """

    spacing: tuple[float, float, float] = (1.5, 1.5, 2.25)
    patch_size: tuple[int, int, int] = (128, 128, 96)
    overlap: float = 0.5
    batch_size: int = 2
    stride: int = 1
    half: bool = False
    amp: bool = True


def stored_settings(state: dict, **overrides) -> EmbedSettings:
    """The embedding settings an APE checkpoint ``state`` was trained for (spacing and window stored at
    pretraining), with ``overrides`` (EmbedSettings fields; None values are ignored) on top."""
    stored = state.get("embed", {})
    values = {"spacing": tuple(stored.get("spacing", EmbedSettings.spacing)),
              "patch_size": tuple(stored.get("patch_size", EmbedSettings.patch_size))}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return EmbedSettings(**values)


def gaussian_weights(size: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Blending weights ``(X, Y, Z)``: Gaussian with sigma = size/8 per axis, peak 1, minimum > 0."""
    axes = []
    for n in size:
        x = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        axes.append(torch.exp(-0.5 * (x / max(n * sigma_scale, 1e-3)) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return (w / w.max()).clamp_min(1e-3)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of windows of length ``patch`` covering ``[0, size)`` with at least ``overlap`` overlap."""
    if size <= patch:
        return [0]
    n = int(np.ceil((size - patch) / (patch * (1 - overlap)))) + 1
    return [int(round(s)) for s in np.linspace(0, size - patch, n)]


@torch.no_grad()
def sliding_window(
    model: nn.Module, image: torch.Tensor, settings: EmbedSettings, device: torch.device, progress: bool = True
) -> torch.Tensor:
    """Run ``model`` over ``image`` ``(1, X, Y, Z)`` (network input) -> map ``(C, X, Y, Z)`` float32 on ``device``."""
    size = image.shape[-3:]
    patch = [min(p, s) for p, s in zip(settings.patch_size, size)]
    weights = gaussian_weights(patch).to(device)
    corners = list(itertools.product(*(window_starts(s, p, settings.overlap) for s, p in zip(size, patch))))
    out = None
    norm = torch.zeros(size, device=device)
    use_amp = settings.amp and device.type == "cuda"
    for i in tqdm(range(0, len(corners), settings.batch_size), desc="embed", unit="batch", leave=False, disable=not progress):
        group = corners[i : i + settings.batch_size]
        crops = torch.stack(
            [image[:, c[0] : c[0] + patch[0], c[1] : c[1] + patch[1], c[2] : c[2] + patch[2]] for c in group]
        ).to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
            pred = model(crops).float()
        if out is None:
            out = torch.zeros((pred.shape[1], *size), device=device)
        for c, p in zip(group, pred):
            region = (slice(None), slice(c[0], c[0] + patch[0]), slice(c[1], c[1] + patch[1]), slice(c[2], c[2] + patch[2]))
            out[region] += p * weights
            norm[region[1:]] += weights
    return out / norm


@dataclass
class NetworkMap:
    """An APE network's output over a whole CT, before it is resampled onto the CT's voxels (what
    :func:`network_map` returns). ``array``: ``(C, X', Y', Z')`` float32 on the model's grid (canonical axes, the
    settings' spacing), on the device the network ran on; ``ct``: the CT it was computed on, in canonical order."""

    array: torch.Tensor
    ct: CanonicalCT


@dataclass
class CanonicalMap:
    """An APE map on the canonical CT's voxels: what retrieval and label transfer search.

    volume: a canonical Volume ``(X', Y', Z', C)`` (float32, float16 with ``half``) holding the map at the canonical
    voxels that are every ``stride``-th voxel of the CT as stored (:func:`strided_start`: along an axis the CT stores
    flipped they start at canonical voxel ``(n - 1) % stride``), with those voxels' geometry (spacing x ``stride``).
    stride: 1 for a map on every voxel. ct: the CT, in canonical order, that the map belongs to.
    """

    volume: Volume
    stride: int
    ct: CanonicalCT

    @property
    def start(self) -> tuple[int, int, int]:
        """Canonical index of the CT voxel under map voxel 0, per canonical axis."""
        return strided_start(self.ct.canon.shape, self.ct.orientation.flip, self.stride)

    @property
    def source_shape(self) -> tuple[int, int, int]:
        """The map's shape in the CT's own axis order ``(X, Y, Z)`` (voxel j on CT voxel ``stride * j``)."""
        return tuple(len(range(0, n, self.stride)) for n in self.ct.source.shape)  # type: ignore[return-value]

    def on_source_grid(self) -> Volume:
        """The map in the CT's own order: a Volume ``(X, Y, Z, C)`` on every ``stride``-th voxel of the CT (its
        origin and direction, spacing x ``stride``), the CT's own grid for stride 1 (see :func:`embed_volume`)."""
        source = self.ct.source
        if self.stride == 1:
            return from_canonical(self.volume.array, self.ct.orientation, source)
        # voxel j of the strided map lies on input voxel stride * j: same origin and direction, spacing x stride
        strided = Volume(np.empty(self.source_shape, dtype=np.uint8), tuple(float(s) * self.stride for s in source.spacing),
                         source.origin, np.array(source.direction))
        return from_canonical(self.volume.array, self.ct.orientation, strided)

    @classmethod
    def from_source_grid(cls, embedding: Volume, ct: Volume | CanonicalCT) -> "CanonicalMap":
        """A map on the CT's own grid (what :func:`embed_volume` returns, any stride) brought into canonical order."""
        ct = canonical_ct(ct)
        stride = int(np.rint(embedding.spacing[0] / ct.source.spacing[0]))
        return cls(to_canonical(embedding)[0], stride, ct)


def strided_start(canon_shape: Sequence[int], flip: Sequence[bool], stride: int) -> tuple[int, int, int]:
    """Per canonical axis, the canonical index of the first of the CT voxels ``0, stride, 2 * stride, ...`` of the
    CT's own axis: ``(n - 1) % stride`` where the CT stores the axis flipped, else 0."""
    return tuple((n - 1) % stride if flipped else 0 for n, flipped in zip(canon_shape, flip))  # type: ignore[return-value]


@torch.no_grad()
def network_map(
    model: nn.Module, volume: Volume | CanonicalCT, settings: EmbedSettings | None = None, device: str | torch.device = "cpu",
    progress: bool = True,
) -> NetworkMap:
    """The expensive half of :func:`embed_volume`: the CT (HU, any orientation; or already in canonical order)
    resampled to the model's spacing and run through ``model`` in sliding windows. ``settings.stride`` and
    ``settings.half`` play no part here, so one network map gives the maps of every stride (:func:`canonical_map`)."""
    settings = settings or EmbedSettings()
    device = torch.device(device)
    model = model.to(device).eval()
    ct = canonical_ct(volume)
    canon = ct.canon
    # resampling runs where the network runs: on a GPU it would otherwise dominate the time
    x = model.input_from_hu(canon.array)[None].to(device)  # each model normalizes HU its own way
    x, _ = resample_spacing(x, canon.spacing, settings.spacing)
    embedding = sliding_window(model, x, settings, device, progress)
    return NetworkMap(embedding, ct)


def canonical_map(network: NetworkMap, settings: EmbedSettings | None = None) -> CanonicalMap:
    """A network map resampled onto the canonical CT's voxels: every voxel for ``settings.stride`` 1, else the
    canonical voxels that are every stride-th voxel of the CT as stored (:class:`CanonicalMap`). float32, or float16
    when ``settings.half``."""
    settings = settings or EmbedSettings()
    canon, stride = network.ct.canon, settings.stride
    start = strided_start(canon.shape, network.ct.orientation.flip, stride)
    coords = []
    for n, s, m, first in zip(canon.shape, canon.spacing, settings.spacing, start):
        canonical_index = torch.arange(first, n, stride, dtype=torch.float32)
        coords.append(canonical_index * s / m)  # model-grid index = canonical index * s_in / s_model
    array = resample_in_slabs(network.array, coords, np.float16 if settings.half else np.float32)
    if stride == 1:
        volume = Volume(array, canon.spacing, canon.origin, np.array(canon.direction))
    else:
        origin = tuple(float(v) for v in canon.index_to_physical(np.asarray(start, dtype=np.float64)))
        volume = Volume(array, tuple(float(s) * stride for s in canon.spacing), origin, np.array(canon.direction))
    return CanonicalMap(volume, stride, network.ct)


SLAB_ELEMENTS = 1 << 25  # output elements resampled at once (128 MB float32): a 512x512x300 CT's map is 30x that


def resample_in_slabs(array: torch.Tensor, coords: Sequence[torch.Tensor], dtype: type = np.float32,
                      slab_elements: int = SLAB_ELEMENTS) -> np.ndarray:
    """:func:`~nnunet_ape.resample.resample_grid` of ``array`` ``(C, X, Y, Z)`` (any device) at ``coords`` -> a
    numpy array ``(X', Y', Z', C)`` of ``dtype`` in host memory, the same values. Computed in slabs of output
    slices (last axis), each from the few source slices it needs and moved to the host at once: on a GPU the
    full-resolution temporaries of a large CT (GBs) would otherwise all be on the device together."""
    cx, cy, cz = (c.to(torch.float32) for c in coords)
    n = array.shape[-1]
    # the lower neighbour of each output slice, as lerp_axis picks it: a slab from the lowest to the highest + 1 keeps
    # every output voxel's pair of source slices and weight, so the values are bit for bit the unsliced ones
    lower = cz.clamp(0, n - 1).floor().long().clamp(max=max(n - 2, 0))
    out = np.empty((len(cx), len(cy), len(cz), array.shape[0]), dtype=dtype)
    step = max(1, slab_elements // max(1, len(cx) * len(cy) * array.shape[0]))
    for first in range(0, len(cz), step):
        part = slice(first, first + step)
        lo, hi = int(lower[part].min()), min(n, int(lower[part].max()) + 2)
        slab = resample_grid(array[..., lo:hi], (cx, cy, cz[part] - lo))
        out[:, :, part] = slab.permute(1, 2, 3, 0).cpu().numpy()
    return out


@dataclass
class GridMap:
    """An APE map on the model's own grid (canonical axes, the model's spacing), where the network computed it: no
    resampling, a few times fewer voxels than the CT (a 512x512x300 CT at 0.8 x 0.8 x 1.5 mm has 5x more than its
    map at 1.5 x 1.5 x 2.25 mm). What organ boxes are found on (:func:`grid_map`).

    array: ``(X', Y', Z', C)`` float32 in host memory; map voxel ``j`` lies on canonical CT index ``j * step`` (voxel
    0 on voxel 0, as :func:`~nnunet_ape.resample.resample_spacing` keeps it). step: canonical CT voxels per map voxel
    per canonical axis (model spacing / CT spacing). ct: the CT, in canonical order, that the map belongs to."""

    array: np.ndarray
    step: tuple[float, float, float]
    ct: CanonicalCT

    @property
    def spacing(self) -> tuple[float, float, float]:
        """mm between map voxels along the canonical axes."""
        return tuple(float(s) * t for s, t in zip(self.ct.canon.spacing, self.step))  # type: ignore[return-value]

    def nearest_voxels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per canonical axis the canonical CT index nearest each map voxel (int, within the CT)."""
        return tuple(np.minimum(np.rint(np.arange(m) * t), n - 1).astype(np.int64)  # type: ignore[return-value]
                     for m, t, n in zip(self.array.shape[:3], self.step, self.ct.canon.shape))

    def box_to_canonical(self, box: np.ndarray) -> np.ndarray:
        """A float box ``(2, 3)`` in map voxels -> canonical CT voxels, each side widened by half a map cell less half
        a CT voxel (a map voxel stands for the CT voxels around it)."""
        step = np.asarray(self.step, dtype=np.float64)
        half = np.maximum(step - 1, 0) / 2
        box = np.asarray(box, dtype=np.float64)
        return np.stack([box[0] * step - half, box[1] * step + half])


def grid_map(network: NetworkMap, settings: EmbedSettings | None = None) -> GridMap:
    """A network map (computed with ``settings``' spacing) as it is, on the model's grid, in host memory
    (:class:`GridMap`): map voxel ``j`` on canonical index ``j * model spacing / CT spacing``, per axis."""
    settings = settings or EmbedSettings()
    step = tuple(float(m) / float(s) for m, s in zip(settings.spacing, network.ct.canon.spacing))
    array = np.ascontiguousarray(network.array.permute(1, 2, 3, 0).float().cpu().numpy())
    return GridMap(array, step, network.ct)  # type: ignore[arg-type]


def map_on_grid(network: NetworkMap, settings: EmbedSettings | None = None) -> Volume:
    """A network map (with ``settings``' spacing) resampled onto the CT's own grid: a Volume ``(X, Y, Z, C)`` on
    every ``settings.stride``-th voxel of the CT (see :func:`embed_volume`)."""
    return canonical_map(network, settings).on_source_grid()


def embed_volume(
    model: nn.Module, volume: Volume | CanonicalCT, settings: EmbedSettings | None = None, device: str | torch.device = "cpu",
    progress: bool = True,
) -> Volume:
    """APE map of a CT in the CT's own geometry.

    volume: CT in HU, any orientation (or a :class:`~nnunet_ape.canonical.CanonicalCT`). Returns a Volume whose array
    is ``(X, Y, Z, C)`` (C = 3) on the input grid (same size, spacing, origin, direction), or with ``settings.stride
    = 4`` on every 4th voxel of it (spacing x4, same origin and direction). float32, or float16 when
    ``settings.half``. The same as :func:`network_map` followed by :func:`map_on_grid`; steps that work in canonical
    order take :func:`canonical_map` instead and skip the trip to the CT's grid and back.
    """
    return map_on_grid(network_map(model, volume, settings, device, progress), settings)
