"""Whole-volume APE maps: resample to the model's spacing, sliding windows with Gaussian blending, map back.

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
    """An APE network's output over a whole CT, before it is resampled onto the CT's grid (what
    :func:`network_map` returns). ``array``: ``(C, X', Y', Z')`` float32 on the model's grid (canonical axes, the
    settings' spacing), on the device the network ran on; ``orientation``: the CT's canonical orientation;
    ``canon_shape`` / ``canon_spacing``: the canonical CT's shape (voxels) and spacing (mm)."""

    array: torch.Tensor
    orientation: object
    canon_shape: tuple[int, int, int]
    canon_spacing: tuple[float, float, float]


@torch.no_grad()
def network_map(
    model: nn.Module, volume: Volume, settings: EmbedSettings | None = None, device: str | torch.device = "cpu", progress: bool = True
) -> NetworkMap:
    """The expensive half of :func:`embed_volume`: the CT (HU, any orientation) resampled to the model's spacing and
    run through ``model`` in sliding windows. ``settings.stride`` and ``settings.half`` play no part here, so one
    network map gives the maps of every stride (:func:`map_on_grid`)."""
    settings = settings or EmbedSettings()
    device = torch.device(device)
    model = model.to(device).eval()
    canon, orientation = to_canonical(volume)
    # resampling runs where the network runs: on a GPU it would otherwise dominate the time
    x = model.input_from_hu(canon.array)[None].to(device)  # each model normalizes HU its own way
    x, _ = resample_spacing(x, canon.spacing, settings.spacing)
    embedding = sliding_window(model, x, settings, device, progress)
    return NetworkMap(embedding, orientation, tuple(canon.shape), tuple(canon.spacing))


def map_on_grid(network: NetworkMap, volume: Volume, settings: EmbedSettings | None = None) -> Volume:
    """A network map (of ``volume``, with ``settings``' spacing) resampled onto the CT's grid: a Volume ``(X, Y, Z,
    C)`` on every ``settings.stride``-th voxel of ``volume`` (see :func:`embed_volume`)."""
    settings = settings or EmbedSettings()
    # back onto the input grid: canonical indices of input voxels 0, stride, 2*stride, ... along each axis
    coords = []
    for n, s, m, flipped in zip(network.canon_shape, network.canon_spacing, settings.spacing, network.orientation.flip):
        taken = torch.arange(0, n, settings.stride, dtype=torch.float32)
        canonical_index = (n - 1 - taken).flip(0) if flipped else taken
        coords.append(canonical_index * s / m)  # model-grid index = canonical index * s_in / s_model
    array = resample_grid(network.array, coords).permute(1, 2, 3, 0).cpu().numpy()
    array = array.astype(np.float16 if settings.half else np.float32)
    if settings.stride == 1:
        return from_canonical(array, network.orientation, volume)
    # voxel j of the strided map lies on input voxel stride * j: same origin and direction, spacing x stride
    strided = Volume(
        np.empty([len(range(0, n, settings.stride)) for n in volume.shape], dtype=np.uint8),
        tuple(float(s) * settings.stride for s in volume.spacing),
        volume.origin,
        np.array(volume.direction),
    )
    return from_canonical(array, network.orientation, strided)


def embed_volume(
    model: nn.Module, volume: Volume, settings: EmbedSettings | None = None, device: str | torch.device = "cpu", progress: bool = True
) -> Volume:
    """APE map of a CT in the CT's own geometry.

    volume: CT in HU, any orientation. Returns a Volume whose array is ``(X, Y, Z, C)`` (C = 3) on the input grid
    (same size, spacing, origin, direction), or with ``settings.stride = 4`` on every 4th voxel of it (spacing x4,
    same origin and direction). float32, or float16 when ``settings.half``. The same as :func:`network_map` followed
    by :func:`map_on_grid`.
    """
    return map_on_grid(network_map(model, volume, settings, device, progress), volume, settings)
