"""What one CT gives for nnU-Net's inputs: organ boxes from a localizer and embedding channels, from one APE pass
and one BPR pass whatever the number of organs.

Channels are on the CT's own grid (``(X, Y, Z)`` index order of :class:`nnunet_ape.io.Volume`), computed on the
whole CT, so a crop of them keeps each voxel's global position:

- ``ape``: the 3 APE components (zero mean, unit std by the network's last BatchNorm: O(1) values);
- ``bpr``: each axial slice's cleaned BPR score, constant within the slice. With a calibrated model the score in
  landmark units divided by 100 (0 = start of the pelvis, 1 = end of the eyes), else the raw score. Slices without
  body (no score) take the score of the nearest slice with body.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnunet_ape.bpr.calibration import Calibration
from nnunet_ape.bpr.scoring import load_bpr_model
from nnunet_ape.checkpoint import load_ape_model
from nnunet_ape.crop_geometry import crop_box, union_box
from nnunet_ape.embed import EmbedSettings, embed_volume, stored_settings
from nnunet_ape.errors import InputError
from nnunet_ape.io import Volume, from_canonical, to_canonical
from nnunet_ape.localize.localizer import load_localizer, map_stride, predict_organ_boxes
from nnunet_ape.localize.zrange import score_ct

CHANNELS = ("ape", "bpr")
CHANNEL_NAMES = {"ape": ("APE_x", "APE_y", "APE_z"), "bpr": ("BPR",)}
BPR_CHANNEL_SCALE = 100.0  # calibrated landmark units (pelvis start 0, eyes end 100) -> O(1)


@dataclass
class FeatureModels:
    """Everything needed per case: the localizer (None for whole-image channel datasets), the models and which
    ``channels`` to compute. Build it with :func:`load_feature_models`."""

    localizer: dict | None
    organs: list[str]
    channels: tuple[str, ...]
    ape: nn.Module | None
    bpr: nn.Module | None
    embed_settings: EmbedSettings | None
    bpr_calibration: Calibration | None
    device: str
    ape_path: Path | None = None
    bpr_path: Path | None = None


def added_channel_names(channels: tuple[str, ...] | list[str]) -> list[str]:
    """Names of the channels of the kinds ``channels`` in file order (``APE_x``, ``APE_y``, ``APE_z``, ``BPR``)."""
    return [name for c in channels for name in CHANNEL_NAMES[c]]


def check_channels(channels: list[str] | None) -> tuple[str, ...]:
    """The requested channel kinds in canonical order (ape before bpr); InputError for an unknown one."""
    channels = list(channels or [])
    unknown = [c for c in channels if c not in CHANNELS]
    if unknown:
        raise InputError(f"--channels {unknown[0]}: unknown channel; choose from {', '.join(CHANNELS)}")
    return tuple(c for c in CHANNELS if c in channels)


def load_feature_models(localizer_path: Path | None, organs: list[str] | None, channels: tuple[str, ...],
                        ape_path: Path | None = None, bpr_path: Path | None = None, device: str = "cpu") -> FeatureModels:
    """Read the localizer (its checkpoints' SHA-256 checked; ``ape_path``/``bpr_path`` override moved ones, or
    give the models for channels when the localizer has none) and load the models the localizer and the
    ``channels`` need. InputError for an organ the localizer was not fitted for, or a channel without its model."""
    localizer = None
    if localizer_path is not None:
        # load_localizer checks an override only for the models the localizer has; the others stay for channels
        localizer, loc_ape, loc_bpr = load_localizer(localizer_path, ape_path, bpr_path)
        ape_path, bpr_path = loc_ape or ape_path, loc_bpr or bpr_path
        fitted = list(localizer["organs"])
        organs = organs or fitted
        missing = [o for o in organs if o not in fitted]
        if missing:
            raise InputError(f"organ '{missing[0]}': the localizer {localizer_path} was not fitted for it (it knows: "
                             f"{', '.join(fitted)}); fit one with 'nnunet-ape localize fit --organs ...'")
    if "ape" in channels and ape_path is None:
        raise InputError("--channels ape needs an APE model: a localizer fitted with one, or -m CHECKPOINT")
    if "bpr" in channels and bpr_path is None:
        raise InputError("--channels bpr needs a BPR model: a localizer fitted with one, or --bpr-model CHECKPOINT")
    needs_ape = "ape" in channels or (localizer is not None and "ape" in localizer["method"])
    needs_bpr = "bpr" in channels or (localizer is not None and "bpr" in localizer["method"])
    ape = settings = bpr = calibration = None
    if needs_ape:
        ape, state = load_ape_model(ape_path)
        settings = stored_settings(state)
    if needs_bpr:
        bpr, state = load_bpr_model(bpr_path)
        calibration = Calibration.from_dict(state["calibration"]) if state.get("calibration") else None
    return FeatureModels(localizer, list(organs or []), channels, ape, bpr, settings, calibration, device,
                         Path(ape_path) if needs_ape else None, Path(bpr_path) if needs_bpr else None)


@dataclass
class CaseFeatures:
    """One CT's boxes and channels. ``boxes``: per organ the localizer's result (see
    :func:`nnunet_ape.localize.localizer.predict_organ_boxes`); ``crop_box``: the union of the organs' crop boxes as an
    integer crop box (None without a localizer); ``channels``: ``(X, Y, Z, n)`` float32 or None."""

    boxes: dict
    crop_box: np.ndarray | None
    channels: np.ndarray | None


@torch.no_grad()
def case_features(models: FeatureModels, ct: Volume, passes: dict | None = None) -> CaseFeatures:
    """Localize the organs of ``models`` on ``ct`` (HU, any orientation) and compute its channels, with one APE
    and one BPR pass. ``passes``: a dict shared by the calls for several ``models`` on the same CT (several
    localizers, one per model), so that each checkpoint runs once per CT; it holds the APE maps and BPR scores.
    Without APE channels the map is computed on every few voxels only (:func:`map_stride`): boxes need no more,
    and resampling a map back to every voxel of a large CT costs more than the network pass."""
    passes = {} if passes is None else passes
    embedding = scored = None
    canon = None
    if models.ape is not None:
        settings = models.embed_settings
        key = ("ape", str(models.ape_path), repr(settings))
        boxes_only = "ape" not in models.channels and (models.localizer or {}).get("ape_boxes") != "all-voxels"
        if boxes_only and key not in passes:  # boxes need the map at the model's coarse spacing only
            settings = replace(settings, stride=map_stride(ct.spacing, settings.spacing))
            key = ("ape", str(models.ape_path), repr(settings))
        if key not in passes:
            passes[key] = embed_volume(models.ape, ct, settings, device=models.device, progress=False)
        embedding = passes[key]
    if models.bpr is not None:
        key = ("bpr", str(models.bpr_path))
        if key not in passes:
            canon, orientation = to_canonical(ct)
            passes[key] = (canon, orientation, score_ct(models.bpr, canon, models.device))
        canon, orientation, scored = passes[key]
    boxes, box = {}, None
    if models.localizer is not None:
        boxes = predict_organ_boxes(models.localizer, ct, embedding, scored, models.organs)
        for organ in models.organs:
            organ_box = crop_box(np.asarray(boxes[organ]["crop_box_voxels"]), ct.shape)
            box = organ_box if box is None else union_box(box, organ_box)
    parts = []
    if "ape" in models.channels:
        parts.append(embedding.array.astype(np.float32))
    if "bpr" in models.channels:
        parts.append(bpr_channel(scored.scores, models.bpr_calibration, canon, orientation, ct)[..., None])
    return CaseFeatures(boxes, box, np.concatenate(parts, axis=3) if parts else None)


def bpr_channel(scores: np.ndarray, calibration: Calibration | None, canon: Volume, orientation, ct: Volume) -> np.ndarray:
    """Cleaned canonical slice scores ``(Z,)`` (NaN without body) -> a volume ``(X, Y, Z)`` float32 on ``ct``'s
    grid: each voxel holds its slice's score (calibrated / 100 when ``calibration`` is given)."""
    values = calibration.apply(scores) / BPR_CHANNEL_SCALE if calibration is not None else np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(values)
    index = np.arange(len(values))
    filled = np.interp(index, index[finite], values[finite]) if finite.any() else np.zeros(len(values))
    canon_volume = np.broadcast_to(filled.astype(np.float32)[None, None, :], canon.shape)
    return from_canonical(np.ascontiguousarray(canon_volume), orientation, ct).array
