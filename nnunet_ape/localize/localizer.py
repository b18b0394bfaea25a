"""Localizer files: fit them from labeled shots, predict organ boxes with them.

A localizer is human-readable JSON: the APE checkpoint it belongs to (path and SHA-256), the embedding settings,
and per organ its label value, calibrated alpha and the edge-point query embeddings of every shot.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from torch import nn
from tqdm import tqdm

from nnunet_ape.atomic import atomic_path
from nnunet_ape.checkpoint import file_hash, load_ape_model, load_checkpoint
from nnunet_ape.embed import EmbedSettings, embed_volume
from nnunet_ape.errors import InputError
from nnunet_ape.io import Volume
from nnunet_ape.localize.boxes import enlarge_box
from nnunet_ape.localize.cases import LabeledCase, read_case
from nnunet_ape.localize.fewshot import calibrate_alpha, predict_box, shot_queries

LOCALIZER_FORMAT = "nnunet-ape/localizer-v1"


def embed_settings_for(checkpoint: Path) -> EmbedSettings:
    """The embedding settings stored in an APE checkpoint (maps stored as float16: retrieval needs no more)."""
    stored = load_checkpoint(checkpoint).get("embed", {})
    defaults = EmbedSettings()
    return EmbedSettings(
        spacing=tuple(stored.get("spacing", defaults.spacing)), patch_size=tuple(stored.get("patch_size", defaults.patch_size)), half=True
    )


def fit_localizer(
    cases: list[LabeledCase], organs: dict[str, int], checkpoint: Path, device: str = "cpu",
    target_recall: float = 0.99, combine: str = "mean",
) -> dict:
    """Fit a localizer on labeled shots. Every organ must be present in every case (InputError otherwise)."""
    model, _ = load_ape_model(checkpoint)
    settings = embed_settings_for(checkpoint)
    edges: dict[str, list[np.ndarray]] = {o: [] for o in organs}
    maps, masks = [], {o: [] for o in organs}
    for case in tqdm(cases, desc="embedding shots", unit="case"):
        ct, label = read_case(case)
        for organ, value in organs.items():
            if not (label == value).any():
                raise InputError(f"{case.label}: organ '{organ}' (label {value}) is missing from case '{case.name}'; drop the case or the organ")
        embedding = embed_volume(model, ct, settings, device=device, progress=False).array
        maps.append(embedding)
        for organ, value in organs.items():
            mask = label == value
            edges[organ].append(shot_queries(embedding, mask))
            masks[organ].append(mask)
    organ_entries = {}
    for organ, value in organs.items():
        alpha = calibrate_alpha(edges[organ], maps, masks[organ], target_recall, combine)
        organ_entries[organ] = {
            "label": int(value),
            "alpha": alpha,
            "shots": [{"case": c.name, "edge_embeddings": e.round(5).tolist()} for c, e in zip(cases, edges[organ])],
        }
    return {
        "format": LOCALIZER_FORMAT,
        "method": "ape-edge-points",
        "ape_checkpoint": str(Path(checkpoint).resolve()),
        "ape_sha256": file_hash(checkpoint),
        "embed_settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()},
        "combine": combine,
        "target_recall": target_recall,
        "shots": [c.name for c in cases],
        "organs": organ_entries,
    }


def save_localizer(localizer: dict, path: Path) -> Path:
    """Write a localizer as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(localizer, indent=1))
    return Path(path)


def load_localizer(path: Path, checkpoint: Path | None = None) -> tuple[dict, Path]:
    """Read a localizer and locate its APE checkpoint (``checkpoint`` overrides the stored path); the checkpoint's
    hash must match the one the localizer was fitted with."""
    try:
        localizer = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a readable localizer file ({type(error).__name__})") from None
    if localizer.get("format") != LOCALIZER_FORMAT:
        raise InputError(f"{path}: not an {LOCALIZER_FORMAT} file")
    ape = Path(checkpoint or localizer["ape_checkpoint"])
    if not ape.exists():
        raise InputError(f"{path}: its APE checkpoint {ape} is missing; pass it with -m")
    if file_hash(ape) != localizer["ape_sha256"]:
        raise InputError(f"{ape}: not the APE checkpoint this localizer was fitted with (SHA-256 differs)")
    return localizer, ape


def _corners_mm(volume: Volume, box: np.ndarray) -> dict:
    corners = volume.index_to_physical(box)
    return {"lo_corner_mm": corners[0].round(2).tolist(), "hi_corner_mm": corners[1].round(2).tolist(),
            "min_mm": corners.min(0).round(2).tolist(), "max_mm": corners.max(0).round(2).tolist()}


def check_organs(localizer: dict, organs: list[str] | None) -> list[str]:
    """The requested organs (all of the localizer's when None); InputError naming the first unknown one."""
    names = organs or list(localizer["organs"])
    unknown = [o for o in names if o not in localizer["organs"]]
    if unknown:
        raise InputError(f"unknown organ '{unknown[0]}'; this localizer knows: {', '.join(localizer['organs'])}")
    return names


def predict_organ_boxes(localizer: dict, embedding: Volume, organs: list[str] | None = None) -> dict:
    """Boxes per organ on a map Volume ``(X, Y, Z, C)``: voxel indices and mm, before and after enlargement."""
    names = check_organs(localizer, organs)
    out = {}
    for organ in names:
        entry = localizer["organs"][organ]
        edges = [np.asarray(s["edge_embeddings"], dtype=np.float64) for s in entry["shots"]]
        box, per_shot = predict_box(edges, embedding.array, localizer["combine"])
        big = enlarge_box(box, entry["alpha"], embedding.shape)
        out[organ] = {
            "label": entry["label"],
            "alpha": entry["alpha"],
            "box_voxels": box.round(2).tolist(),
            "box": _corners_mm(embedding, box),
            "enlarged_box_voxels": big.round(2).tolist(),
            "enlarged_box": _corners_mm(embedding, big),
            "per_shot_box_voxels": [b.tolist() for b in per_shot],
        }
    return out


def localize_volume(localizer: dict, model: nn.Module, ct: Volume, device: str = "cpu", organs: list[str] | None = None) -> tuple[dict, Volume]:
    """Embed a CT with the localizer's APE ``model`` (from :func:`load_localizer`'s checkpoint) and predict its
    organ boxes; returns (boxes, map)."""
    settings = EmbedSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in localizer["embed_settings"].items()})
    embedding = embed_volume(model, ct, settings, device=device, progress=False)
    return predict_organ_boxes(localizer, embedding, organs), embedding

