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

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnunet_ape.bpr.calibration import Calibration
from nnunet_ape.bpr.scoring import load_bpr_model
from nnunet_ape.canonical import CanonicalCT, canonical_ct
from nnunet_ape.checkpoint import load_ape_model
from nnunet_ape.crop_geometry import crop_box, union_box
from nnunet_ape.embed import CanonicalMap, EmbedSettings, GridMap, canonical_map, grid_map, network_map, stored_settings
from nnunet_ape.errors import InputError
from nnunet_ape.io import Volume
from nnunet_ape.localize.localizer import load_localizer
from nnunet_ape.localize.predict_boxes import predict_organ_boxes
from nnunet_ape.localize.zrange import score_ct

CHANNELS = ("ape", "bpr")
CHANNEL_NAMES = {"ape": ("APE_x", "APE_y", "APE_z"), "bpr": ("BPR",)}
BPR_CHANNEL_SCALE = 100.0  # calibrated landmark units (pelvis start 0, eyes end 100) -> O(1)
CT_BELOW_HU = -200.0  # every CT has voxels below this (air -1000, lungs, gas, padding); MR, PET, normalized images do not


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
        organs = _checked_organs(localizer, organs, localizer_path)
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
    loaded = FeatureModels(localizer, [], channels, ape, bpr, settings, calibration, device,
                           Path(ape_path) if needs_ape else None, Path(bpr_path) if needs_bpr else None)
    return with_organs(loaded, organs, localizer_path)


def with_organs(models: FeatureModels, organs: list[str] | None, localizer_path: Path | None = None) -> FeatureModels:
    """``models`` localizing ``organs`` (all the localizer's organs when None; none without a localizer), sharing
    the loaded models and localizer (no copy). InputError for an organ the localizer (``localizer_path``, for the
    message) was not fitted for."""
    if models.localizer is None:
        return replace(models, organs=list(organs or []))
    return replace(models, organs=_checked_organs(models.localizer, organs, localizer_path))


def _checked_organs(localizer: dict, organs: list[str] | None, localizer_path: Path | None) -> list[str]:
    """``organs`` (the localizer's all when None); InputError for one the localizer was not fitted for."""
    fitted = list(localizer["organs"])
    organs = list(organs or fitted)
    missing = [o for o in organs if o not in fitted]
    if missing:
        raise InputError(f"organ '{missing[0]}': the localizer{f' {localizer_path}' if localizer_path else ''} was not fitted for it (it knows: "
                         f"{', '.join(fitted)}); fit one with 'nnunet-ape localize fit --organs ...'")
    return organs


@dataclass
class CaseFeatures:
    """One CT's boxes and channels. ``boxes``: per organ the localizer's result (see
    :func:`nnunet_ape.localize.predict_boxes.predict_organ_boxes`); ``crop_box``: the union of the organs' crop boxes as an
    integer crop box (None without a localizer); ``channels``: ``(X, Y, Z, n)`` float32 or None."""

    boxes: dict
    crop_box: np.ndarray | None
    channels: np.ndarray | None


def require_ct(ct: Volume) -> None:
    """InputError (one line) unless ``ct`` looks like CT in Hounsfield units (some voxel below ``CT_BELOW_HU``):
    the models were trained on CT, and the boxes and channels of another image (an MR or PET first channel, a
    normalized array, unrescaled scanner values) would be garbage."""
    lowest = float(np.min(ct.array))
    if not lowest < CT_BELOW_HU:
        raise InputError(f"the image's lowest value is {lowest:g}, none below {CT_BELOW_HU:g}: not CT in Hounsfield "
                         f"units (air is -1000); APE needs CT as the first channel (_0000, channel_names '0' in "
                         f"dataset.json): put the CT first")


@torch.no_grad()
def case_features(models: FeatureModels, ct: Volume | CanonicalCT, passes: dict | None = None,
                  localize_too: list[str] = ()) -> CaseFeatures:
    """Localize the organs of ``models`` on ``ct`` (HU, any orientation, or a
    :class:`~nnunet_ape.canonical.CanonicalCT`) and compute its channels, with one APE and one BPR pass.
    ``passes``: a dict shared by the calls for several ``models`` on the same CT (several localizers or organ
    groups, one per model), so that each checkpoint runs once per CT and the CT is brought into canonical order
    once; it holds the canonical CT, the network's map (:func:`~nnunet_ape.embed.network_map`), the maps made from
    it, the BPR scores and the boxes found. ``localize_too``: organs of later
    calls with the same localizer, localized in this call's pass (:func:`case_features_many`). Boxes are found on
    the map at the model's own spacing (:func:`~nnunet_ape.embed.grid_map`, no resampling; within about one model
    voxel of the boxes on the full-resolution map), except for an all-voxels localizer (label transfer needs the map
    on every voxel); only APE channels resample the map onto every voxel, in slabs. Everything stays in canonical
    order until the output: boxes and channels come back on the CT's own grid. Each ``models`` gets the boxes and
    channels it would get alone, whatever else shares ``passes``."""
    passes = {} if passes is None else passes
    canon = _canonical(ct, passes)
    source = canon.source
    box_map = scored = None
    map_key = bpr_key = None
    if models.ape is not None and models.localizer is not None:
        box_map, map_key = _box_map(models, canon, passes)
    if models.bpr is not None:
        bpr_key = ("bpr", str(models.bpr_path))
        if bpr_key not in passes:
            passes[bpr_key] = score_ct(models.bpr, canon, models.device)
        scored = passes[bpr_key]
    boxes, box = {}, None
    if models.localizer is not None:
        found = passes.setdefault(("boxes", id(models.localizer), map_key, bpr_key), {})
        wanted = list(dict.fromkeys([*models.organs, *(o for o in localize_too if o in models.localizer["organs"])]))
        missing = [o for o in wanted if o not in found]
        if missing:
            found.update(predict_organ_boxes(models.localizer, canon, box_map, scored, missing))
        boxes = {organ: copy.deepcopy(found[organ]) for organ in models.organs}
        for organ in models.organs:
            organ_box = crop_box(np.asarray(boxes[organ]["crop_box_voxels"]), source.shape)
            box = organ_box if box is None else union_box(box, organ_box)
    parts = []
    if "ape" in models.channels:  # the canonical map (stride 1) back on the CT's grid: the one trip back
        parts.append(_full_map(models, canon, passes)[0].on_source_grid().array.astype(np.float32, copy=False))
    if "bpr" in models.channels:
        parts.append(bpr_channel(scored.scores, models.bpr_calibration, canon)[..., None])
    return CaseFeatures(boxes, box, np.concatenate(parts, axis=3) if parts else None)


def _canonical(ct: Volume | CanonicalCT, passes: dict) -> CanonicalCT:
    """The CT of ``passes`` in canonical order: made (and checked to be CT, :func:`require_ct`) by the first call
    for the CT, shared by the others."""
    if ("ct",) not in passes:
        require_ct(ct.source if isinstance(ct, CanonicalCT) else ct)  # before any work on it
        passes[("ct",)] = canonical_ct(ct)
    return passes[("ct",)]


def case_features_many(models: list[FeatureModels], ct: Volume | CanonicalCT, passes: dict | None = None) -> list[CaseFeatures]:
    """:func:`case_features` of each of ``models`` on one CT: one network pass per APE checkpoint, one BPR pass
    per BPR checkpoint, and one localization per localizer and map for all the organ groups that share them (the
    organ groups of several crop configurations). Returns what each ``models`` would get alone, in order."""
    passes = {} if passes is None else passes
    organs_of: dict[int, list[str]] = {}
    for m in models:
        if m.localizer is not None:
            organs_of.setdefault(id(m.localizer), []).extend(m.organs)
    return [case_features(m, ct, passes, organs_of.get(id(m.localizer), [])) for m in models]


def _network(models: FeatureModels, ct: CanonicalCT, passes: dict):
    """The APE network's map of ``ct`` (:func:`~nnunet_ape.embed.network_map`): computed by the first call for its
    checkpoint and settings, shared by the others."""
    settings = replace(models.embed_settings, stride=1, half=False)
    key = ("ape-network", str(models.ape_path), repr(settings))
    if key not in passes:
        passes[key] = network_map(models.ape, ct, settings, device=models.device, progress=False)
    return passes[key]


def _full_map(models: FeatureModels, ct: CanonicalCT, passes: dict) -> tuple[CanonicalMap, tuple]:
    """The canonical APE map on every CT voxel (what APE channels and an all-voxels localizer need) and its key in
    ``passes``, resampled once per checkpoint and settings."""
    settings = replace(models.embed_settings, stride=1, half=False)
    key = ("ape", str(models.ape_path), repr(settings))
    if key not in passes:
        passes[key] = canonical_map(_network(models, ct, passes), settings)
    return passes[key], key


def _box_map(models: FeatureModels, ct: CanonicalCT, passes: dict) -> tuple[CanonicalMap | GridMap, tuple]:
    """The APE map organ boxes are found on, and its key in ``passes``: the network's map on the model's own grid
    (no resampling: boxes need no finer map, and a large CT's map on every voxel takes GBs), or for an all-voxels
    localizer the map on every voxel."""
    if (models.localizer or {}).get("ape_boxes") == "all-voxels":
        return _full_map(models, ct, passes)
    settings = replace(models.embed_settings, stride=1, half=False)
    key = ("ape-grid", str(models.ape_path), repr(settings))
    if key not in passes:
        passes[key] = grid_map(_network(models, ct, passes), settings)
    return passes[key], key


def bpr_channel(scores: np.ndarray, calibration: Calibration | None, ct: CanonicalCT) -> np.ndarray:
    """Cleaned canonical slice scores ``(Z,)`` (NaN without body) -> a volume ``(X, Y, Z)`` float32 on the CT's own
    grid (``ct.source``): each voxel holds its slice's score (calibrated / 100 when ``calibration`` is given)."""
    values = calibration.apply(scores) / BPR_CHANNEL_SCALE if calibration is not None else np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(values)
    index = np.arange(len(values))
    filled = np.interp(index, index[finite], values[finite]) if finite.any() else np.zeros(len(values))
    canon_volume = np.broadcast_to(filled.astype(np.float32)[None, None, :], ct.canon.shape)
    return ct.array_to_source(np.ascontiguousarray(canon_volume))
