"""The localizer file: its format, saving and loading it (checkpoints checked), the organs it knows.

Fitting is :mod:`nnunet_ape.localize.fit`, predicting boxes :mod:`nnunet_ape.localize.predict_boxes`.

A localizer is human-readable JSON. Method ``ape``: the APE checkpoint it belongs to (path and SHA-256), the
embedding settings, and per organ its label value, calibrated alpha and the edge-point query embeddings of every
shot. With ``ape_boxes: all-voxels`` it also holds the shots' labeled samples in embedding space, and
boxes come from label transfer (:mod:`nnunet_ape.localize.label_transfer`), falling back to the edge points for an
organ the transfer does not find. Method ``bpr``: the BPR checkpoint (path and SHA-256) and per organ the score interval of every shot and the
calibrated margin (z only, full x/y). ``ape+bpr``: both; the crop box then takes x/y from APE and z from BPR.
"""

from __future__ import annotations

import json
from pathlib import Path

from nnunet_ape.atomic import atomic_path
from nnunet_ape.checkpoint import file_hash, load_ape_settings
from nnunet_ape.embed import EmbedSettings, stored_settings
from nnunet_ape.errors import InputError


LOCALIZER_FORMAT = "nnunet-ape/localizer-v1"

METHODS = ("ape", "bpr", "ape+bpr", "body")

APE_BOXES = ("all-voxels", "edge-points")


def embed_settings_for(checkpoint: Path) -> EmbedSettings:
    """The embedding settings stored in an APE checkpoint (maps stored as float16: retrieval needs no more)."""
    return stored_settings(load_ape_settings(checkpoint), half=True)


def save_localizer(localizer: dict, path: Path) -> Path:
    """Write a localizer as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(localizer, indent=1))
    return Path(path)


def _checked_checkpoint(localizer: dict, kind: str, override: Path | None, path: Path) -> Path:
    stored = Path(override or localizer[f"{kind}_checkpoint"])
    flag = "-m" if kind == "ape" else "--bpr-model"
    if not stored.exists():
        raise InputError(f"{path}: its {kind.upper()} checkpoint {stored} is missing; pass it with {flag}")
    if file_hash(stored) != localizer[f"{kind}_sha256"]:
        raise InputError(f"{stored}: not the {kind.upper()} checkpoint this localizer was fitted with (SHA-256 differs)")
    return stored


def load_localizer(path: Path, checkpoint: Path | None = None, bpr_checkpoint: Path | None = None) -> tuple[dict, Path | None, Path | None]:
    """Read a localizer and locate its checkpoints (arguments override the stored paths); each checkpoint's hash
    must match the one the localizer was fitted with. Returns (localizer, APE path or None, BPR path or None)."""
    try:
        localizer = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a readable localizer file ({type(error).__name__})") from None
    if localizer.get("format") != LOCALIZER_FORMAT or localizer.get("method") not in METHODS:
        raise InputError(f"{path}: not an {LOCALIZER_FORMAT} file")
    method = localizer["method"]
    ape = _checked_checkpoint(localizer, "ape", checkpoint, path) if "ape" in method.split("+") else None
    bpr = _checked_checkpoint(localizer, "bpr", bpr_checkpoint, path) if "bpr" in method.split("+") else None
    return localizer, ape, bpr


def check_organs(localizer: dict, organs: list[str] | None) -> list[str]:
    """The requested organs (all of the localizer's when None); InputError naming the first unknown one."""
    names = organs or list(localizer["organs"])
    unknown = [o for o in names if o not in localizer["organs"]]
    if unknown:
        raise InputError(f"unknown organ '{unknown[0]}'; this localizer knows: {', '.join(localizer['organs'])}")
    return names


def organ_method(entry: dict, localizer: dict) -> str:
    """The crop method of a localizer's organ ``entry``: its ``method``; for an entry written before methods were
    chosen per organ, the combination of its models, APE's box being label transfer where the localizer has it."""
    if entry.get("method"):
        return entry["method"]
    has_ape, has_bpr = "shots" in entry, "bpr" in entry
    return "ape_bpr" if has_ape and has_bpr else ("ape_all" if has_ape else "bpr_z")
