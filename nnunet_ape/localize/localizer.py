"""Localizer files: fit them from labeled shots, predict organ boxes with them.

A localizer is human-readable JSON. Method ``ape``: the APE checkpoint it belongs to (path and SHA-256), the
embedding settings, and per organ its label value, calibrated alpha and the edge-point query embeddings of every
shot. With ``ape_boxes: all-voxels`` it also holds the shots' labeled samples in embedding space, and
boxes come from label transfer (:mod:`nnunet_ape.localize.label_transfer`), falling back to the edge points for an
organ the transfer does not find. Method ``bpr``: the BPR checkpoint (path and SHA-256) and per organ the score interval of every shot and the
calibrated margin (z only, full x/y). ``ape+bpr``: both; the crop box then takes x/y from APE and z from BPR.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
from torch import nn
from tqdm import tqdm

from nnunet_ape.atomic import atomic_path
from nnunet_ape.checkpoint import file_hash, load_ape_model, load_ape_settings
from nnunet_ape.embed import EmbedSettings, embed_volume, stored_settings
from nnunet_ape.errors import InputError
from nnunet_ape.bpr.scoring import load_bpr_model
from nnunet_ape.io import Volume, canonical_orientation, to_canonical
from nnunet_ape.localize.body import body_box
from nnunet_ape.crop_geometry import box_from_canonical, box_to_canonical, overlaps_image
from nnunet_ape.localize.boxes import enlarge_box
from nnunet_ape.localize.cases import LabeledCase, read_case
from nnunet_ape.localize.fewshot import (
    DEFAULT_ALPHA,
    calibrate_alpha,
    cut_sides,
    held_out_box,
    predict_box,
    shot_queries,
)
from nnunet_ape.localize.label_transfer import (
    DEFAULT_K,
    DEFAULT_STEP_MM,
    DEFAULT_THRESHOLD,
    LabelSamples,
    LabelTransfer,
    Neighbours,
    body_grid,
    calibrate_transfer_alpha,
    held_out_boxes,
)
from nnunet_ape.localize.masks import CroppedMask
from nnunet_ape.localize.store import spill
from nnunet_ape.localize.zrange import ScoredCT, calibrate_margin, combine_intervals, organ_interval, in_range, score_ct, z_box, z_range

LOCALIZER_FORMAT = "nnunet-ape/localizer-v1"


def embed_settings_for(checkpoint: Path) -> EmbedSettings:
    """The embedding settings stored in an APE checkpoint (maps stored as float16: retrieval needs no more)."""
    return stored_settings(load_ape_settings(checkpoint), half=True)


METHODS = ("ape", "bpr", "ape+bpr")
APE_BOXES = ("all-voxels", "edge-points")


def _method(ape: Path | None, bpr: Path | None) -> str:
    if ape is None and bpr is None:
        raise InputError("give an APE checkpoint (-m), a BPR checkpoint (--bpr-model) or both")
    return "ape+bpr" if ape and bpr else ("ape" if ape else "bpr")


def fit_localizer(
    cases: list[LabeledCase], organs: dict[str, int], checkpoint: Path | None, device: str = "cpu",
    target_recall: float = 0.99, combine: str = "mean", bpr_checkpoint: Path | None = None, ape_boxes: str = "edge-points",
) -> dict:
    """Fit a localizer on labeled shots: APE queries (``checkpoint``; ``ape_boxes`` edge-points: the paper's 6
    points, or all-voxels: label transfer from every shot voxel), BPR score intervals (``bpr_checkpoint``) or both.
    Every organ must be present in every case (InputError otherwise)."""
    method = _method(checkpoint, bpr_checkpoint)
    if ape_boxes not in APE_BOXES:
        raise InputError(f"--ape-boxes {ape_boxes}: choose one of {', '.join(APE_BOXES)}")
    ape_model = load_ape_model(checkpoint)[0] if checkpoint else None
    bpr_model = load_bpr_model(bpr_checkpoint)[0] if bpr_checkpoint else None
    settings = embed_settings_for(checkpoint) if checkpoint else None
    edges: dict[str, list[np.ndarray]] = {o: [] for o in organs}
    intervals: dict[str, list[np.ndarray]] = {o: [] for o in organs}
    cuts: dict[str, list[np.ndarray]] = {o: [] for o in organs}
    maps, scored, masks = [], [], {o: [] for o in organs}  # masks: canonical, cropped to their boxes
    samples, grids = [], []  # label transfer: each shot's labeled samples and its sampling grid
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="nnunet-ape-maps-") as store:
        for case in tqdm(cases, desc="reading shots", unit="case"):
            ct, label = read_case(case)
            canon_ct = to_canonical(ct)[0]
            canon_label = to_canonical(ct.with_array(label))[0].array  # shots may differ in orientation
            canon_masks = {organ: canon_label == value for organ, value in organs.items()}
            for organ, mask in canon_masks.items():
                if not mask.any():
                    raise InputError(f"{case.label}: organ '{organ}' (label {organs[organ]}) is missing from case '{case.name}'; drop the case or the organ")
            embedding = None
            if ape_model is not None:
                embedding = to_canonical(embed_volume(ape_model, ct, settings, device=device, progress=False))[0].array
                maps.append(spill(embedding, Path(store), str(len(maps))))  # disk, not memory
                grids.append(body_grid(body_box(canon_ct.array), canon_ct.spacing, canon_ct.shape))
                samples.append(LabelSamples.from_shot(embedding, canon_label, grids[-1], list(organs.values())))
            if bpr_model is not None:
                scored.append(score_ct(bpr_model, canon_ct, device))
            for organ, mask in canon_masks.items():
                cut = cut_sides(mask)
                if embedding is not None:
                    edges[organ].append(shot_queries(embedding, mask))
                    cuts[organ].append(cut)
                if bpr_model is not None:
                    intervals[organ].append(organ_interval(scored[-1].scores, mask))
                masks[organ].append(CroppedMask(mask))
                if cut[:, 2].any():
                    notes.append(f"{organ} reaches the first or last slice of case '{case.name}': the scan cuts it, so that "
                                 "end is not a landmark and the box reaches the image border there; prefer shots that show "
                                 "the whole organ")
        transfer = ape_model is not None and ape_boxes == "all-voxels"
        held = held_out_boxes(samples, maps, grids, list(organs.values())) if transfer else []
        organ_entries = {}
        for organ, value in organs.items():
            entry: dict = {"label": int(value)}
            if ape_model is not None:
                entry["alpha"] = calibrate_alpha(edges[organ], maps, masks[organ], target_recall, combine, cuts[organ])
                entry["alpha_calibrated"] = len(cases) > 1  # leave-one-shot-out needs a second shot
                if transfer:
                    entry["edge_points_alpha"] = entry["alpha"]  # for the fallback to edge points
                    boxes = [b[value] if b[value] is not None else held_out_box(edges[organ], maps[i], i, combine, cuts[organ])
                             for i, b in enumerate(held)]
                    entry["alpha"] = calibrate_transfer_alpha(boxes, masks[organ], target_recall) or DEFAULT_ALPHA
                entry["shots"] = [{"case": c.name, "edge_embeddings": e.round(5).tolist(), "cut_sides": cut.tolist()}
                                  for c, e, cut in zip(cases, edges[organ], cuts[organ])]
            if bpr_model is not None:
                entry["bpr"] = {
                    "margin": calibrate_margin(intervals[organ], scored, masks[organ], target_recall, combine),
                    "intervals": [iv.round(5).tolist() for iv in intervals[organ]],
                }
            organ_entries[organ] = entry
        maps.clear()  # memory maps close before their folder goes
    localizer = {"format": LOCALIZER_FORMAT, "method": method}
    if checkpoint:
        localizer.update({
            "ape_checkpoint": str(Path(checkpoint).resolve()),
            "ape_sha256": file_hash(checkpoint),
            "embed_settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()},
        })
    if bpr_checkpoint:
        localizer.update({"bpr_checkpoint": str(Path(bpr_checkpoint).resolve()), "bpr_sha256": file_hash(bpr_checkpoint)})
    localizer.update({"combine": combine, "target_recall": target_recall, "shots": [c.name for c in cases], "warnings": notes})
    if checkpoint:
        localizer["ape_boxes"] = ape_boxes
    if checkpoint and ape_boxes == "all-voxels":
        pooled = LabelSamples.pooled(samples)
        localizer["label_transfer"] = {"k": DEFAULT_K, "threshold": DEFAULT_THRESHOLD, "step_mm": DEFAULT_STEP_MM,
                                       "labels": pooled.labels.tolist(), "embeddings": pooled.embeddings.round(4).tolist()}
    localizer["organs"] = organ_entries
    return localizer


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


def _transfer_neighbours(localizer: dict, ct: Volume, canon_map: np.ndarray) -> Neighbours:
    """Neighbour labels of the canonical map's body grid among the localizer's stored shot samples."""
    stored = localizer["label_transfer"]
    samples = LabelSamples(np.asarray(stored["embeddings"], dtype=np.float32), np.asarray(stored["labels"], dtype=np.int32))
    canon_ct = to_canonical(ct)[0]
    grid = body_grid(body_box(canon_ct.array), canon_ct.spacing, canon_ct.shape, stored["step_mm"])
    return LabelTransfer(samples, stored["k"]).neighbours(canon_map, grid)


def _ape_boxes(entry: dict, canon_map: np.ndarray, combine: str, neighbours: Neighbours | None, threshold: float) -> dict:
    """Canonical boxes of one organ: ``box`` (label transfer with ``neighbours``, else or where it finds nothing the
    edge points), ``enlarged`` and the edge points' ``per_shot`` boxes; ``how`` says which method gave the box."""
    edges = [np.asarray(s["edge_embeddings"], dtype=np.float64) for s in entry["shots"]]
    cuts = [np.asarray(s.get("cut_sides", np.zeros((2, 3))), dtype=bool) for s in entry["shots"]]
    box, per_shot = predict_box(edges, canon_map, combine, cuts)
    how, alpha = "edge-points", entry.get("edge_points_alpha", entry["alpha"])
    found = neighbours.organ_box(entry["label"], threshold) if neighbours is not None else None
    if found is not None:
        box, how, alpha = found, "all-voxels", entry["alpha"]
    return {"box": box, "enlarged": enlarge_box(box, alpha, canon_map.shape[:3]), "per_shot": per_shot, "how": how, "alpha": alpha}


def map_stride(ct_spacing: tuple[float, ...], model_spacing: tuple[float, ...], most: int = 4) -> int:
    """The coarsest stride (1..``most``) at which a map sampled on every stride-th CT voxel is still no coarser than
    the model's own grid along any axis: boxes need no finer map than that (and it is many times cheaper)."""
    return int(max(1, min(most, np.floor(min(m / c for m, c in zip(model_spacing, ct_spacing)) + 1e-6))))


def strided_to_full(box: np.ndarray, embedding: Volume, ct: Volume) -> np.ndarray:
    """A float box in the voxels of a strided map (voxel j on CT voxel step * j, per axis) -> CT voxels, the high
    corner widened to the last CT voxel of its map cell (so that the box is not cut by the sampling)."""
    steps = np.rint(np.asarray(embedding.spacing) / np.asarray(ct.spacing))
    return np.stack([box[0] * steps, box[1] * steps + steps - 1])


def predict_organ_boxes(localizer: dict, ct: Volume, embedding: Volume | None = None, scored: ScoredCT | None = None,
                        organs: list[str] | None = None) -> dict:
    """Boxes per organ on a CT, in its voxel indices and in mm. APE (with ``embedding``, the map on the CT's grid):
    ``box`` (retrieved) and ``enlarged_box``; BPR (with ``scored``, the canonical slice scores): ``bpr_z_range``
    (slices) and ``bpr_box`` (full x/y); both: ``combined_box`` (APE's enlarged x/y, BPR's z). ``crop_box`` is the
    box to crop with: the combined one when both are there, else the enlarged APE or the BPR box. ``embedding`` may
    be a map on every step-th voxel (``embed_volume`` with a stride; edge-point localizers only): boxes are still in
    the CT's voxels. ``placed``: False
    when the localizer could not place the organ on this CT (no slice scores in its range, or a crop box wholly
    outside the image); its boxes are then only the nearest guess."""
    names = check_organs(localizer, organs)
    orientation = canonical_orientation(ct.direction)
    perm, flip = orientation.perm, orientation.flip
    canon_shape = tuple(ct.shape[p] for p in perm)
    canon_map = to_canonical(embedding)[0].array if embedding is not None else None
    neighbours = None
    if canon_map is not None and localizer.get("ape_boxes") == "all-voxels":
        if embedding.shape != ct.shape:
            raise ValueError("the all-voxels localizer needs the APE map on the CT's own grid (stride 1)")
        neighbours = _transfer_neighbours(localizer, ct, canon_map)
    native = lambda b: box_from_canonical(b, perm, flip, ct.shape)  # noqa: E731
    if embedding is not None and embedding.shape != ct.shape:  # a map on every step-th voxel: boxes in CT voxels
        native = lambda b: strided_to_full(box_from_canonical(b, perm, flip, embedding.shape), embedding, ct)  # noqa: E731
    out = {}
    for organ in names:
        entry = localizer["organs"][organ]
        result: dict = {"label": entry["label"]}
        crop = None
        placed = True
        if canon_map is not None and "shots" in entry:
            found = _ape_boxes(entry, canon_map, localizer["combine"], neighbours, localizer.get("label_transfer", {}).get("threshold", 0))
            box, big = native(found["box"]), native(found["enlarged"])
            result.update({"ape_boxes": found["how"], "alpha": found["alpha"], "box_voxels": box.round(2).tolist(),
                           "box": _corners_mm(ct, box), "enlarged_box_voxels": big.round(2).tolist(),
                           "enlarged_box": _corners_mm(ct, big),
                           "edge_points_per_shot_box_voxels": [native(b).tolist() for b in found["per_shot"]]})
            crop = big
        if scored is not None and "bpr" in entry:
            interval = combine_intervals([np.asarray(iv) for iv in entry["bpr"]["intervals"]], localizer["combine"])
            low, high = z_range(scored.scores, interval, entry["bpr"]["margin"])
            placed = placed and bool(in_range(scored.scores, interval, entry["bpr"]["margin"]).any())
            canon_z = z_box(canon_shape, low, high)
            bpr_box = box_from_canonical(canon_z, perm, flip, ct.shape)
            result.update({"bpr_margin": entry["bpr"]["margin"], "bpr_z_range": [low, high],
                           "bpr_box_voxels": bpr_box.round(2).tolist(), "bpr_box": _corners_mm(ct, bpr_box)})
            if crop is not None:
                combined = box_to_canonical(crop, perm, flip, ct.shape)
                combined[:, 2] = canon_z[:, 2]
                crop = box_from_canonical(combined, perm, flip, ct.shape)
                result.update({"combined_box_voxels": crop.round(2).tolist(), "combined_box": _corners_mm(ct, crop)})
            else:
                crop = bpr_box
        placed = placed and overlaps_image(crop, ct.shape)
        result.update({"crop_box_voxels": crop.round(2).tolist(), "crop_box": _corners_mm(ct, crop), "placed": placed})
        out[organ] = result
    return out


def localize_volume(localizer: dict, ct: Volume, ape_model: nn.Module | None = None, bpr_model: nn.Module | None = None,
                    device: str = "cpu", organs: list[str] | None = None) -> dict:
    """Embed and/or score a CT with the localizer's models (from :func:`load_localizer`'s checkpoints) and predict
    its organ boxes (:func:`predict_organ_boxes`)."""
    embedding = scored = None
    if ape_model is not None:
        settings = EmbedSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in localizer["embed_settings"].items()})
        embedding = embed_volume(ape_model, ct, settings, device=device, progress=False)
    if bpr_model is not None:
        scored = score_ct(bpr_model, to_canonical(ct)[0], device)
    return predict_organ_boxes(localizer, ct, embedding, scored, organs)
