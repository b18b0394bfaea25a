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
from nnunet_ape.bpr.scoring import load_bpr_model
from nnunet_ape.canonical import CanonicalCT, canonical_ct
from nnunet_ape.checkpoint import file_hash, load_ape_model, load_ape_settings
from nnunet_ape.crop_geometry import box_from_canonical, overlaps_image
from nnunet_ape.embed import CanonicalMap, EmbedSettings, canonical_map, network_map, stored_settings
from nnunet_ape.errors import InputError
from nnunet_ape.io import Volume, read_volume
from nnunet_ape.localize.body import body_box, search_region
from nnunet_ape.localize.boxes import calibrated_alpha, enlarge_box, shot_alphas
from nnunet_ape.cases import LabeledCase, label_values, read_case
from nnunet_ape.localize.choice import (
    available_methods,
    box_in_body,
    choose,
    default_method,
    held_out_body_boxes,
    mean_relative_box,
    safety_net,
    selection_scores,
    shot_agreement,
    with_z,
)
from nnunet_ape.localize.fewshot import (
    DEFAULT_ALPHA,
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
    held_out_boxes,
)
from nnunet_ape.localize.masks import CroppedMask
from nnunet_ape.localize.retrieval import outside_to_inf
from nnunet_ape.localize.store import spill
from nnunet_ape.localize.zrange import ScoredCT, calibrate_margin, combine_intervals, organ_interval, in_range, score_ct, z_box, z_range

LOCALIZER_FORMAT = "nnunet-ape/localizer-v1"


def embed_settings_for(checkpoint: Path) -> EmbedSettings:
    """The embedding settings stored in an APE checkpoint (maps stored as float16: retrieval needs no more)."""
    return stored_settings(load_ape_settings(checkpoint), half=True)


METHODS = ("ape", "bpr", "ape+bpr", "body")
APE_BOXES = ("all-voxels", "edge-points")


def _method(ape: Path | None, bpr: Path | None) -> str:
    """The models a localizer uses: ``ape``, ``bpr``, ``ape+bpr``, or ``body`` (none: body boxes only)."""
    return "ape+bpr" if ape and bpr else ("ape" if ape else ("bpr" if bpr else "body"))


def organ_values(case: LabeledCase) -> set[int]:
    """The label values present in a case's label map (read without the CT)."""
    return {int(v) for v in np.unique(label_values(read_volume(case.label, check_finite=False).array, case.label))}


def select_shots(cases: list[LabeledCase], organs: dict[str, int], shots: int | None = None) -> tuple[dict[str, list[int]], list[str]]:
    """Per organ, the indices of the first ``shots`` cases (all when None) whose label map contours it: a case that
    does not contour an organ is no shot for it (partially contoured data sets label an uncontoured organ 0).
    Label files are read in order until every organ has its shots. Returns (indices per organ, warnings);
    InputError for an organ no case contours."""
    chosen: dict[str, list[int]] = {o: [] for o in organs}
    want = len(cases) if shots is None else shots
    for i, case in enumerate(cases):
        if all(len(c) >= want for c in chosen.values()):
            break
        present = organ_values(case)
        for organ, value in organs.items():
            if value in present and len(chosen[organ]) < want:
                chosen[organ].append(i)
    missing = [o for o, c in chosen.items() if not c]
    if missing:
        raise InputError(f"organ '{missing[0]}' (label {organs[missing[0]]}) is contoured in none of the {len(cases)} "
                         "labeled cases; drop it from --organs")
    notes = [f"{o} is contoured in only {len(c)} of the {len(cases)} labeled cases; fitted on those {len(c)} shot(s)"
             for o, c in chosen.items() if shots is not None and len(c) < shots]
    return chosen, notes


def fit_localizer(
    cases: list[LabeledCase], organs: dict[str, int], checkpoint: Path | None, device: str = "cpu",
    target_recall: float = 0.99, combine: str = "mean", bpr_checkpoint: Path | None = None, ape_boxes: str = "edge-points",
    shots: int | None = None, method: str = "auto",
) -> dict:
    """Fit a localizer on labeled shots: per organ the first ``shots`` of ``cases`` that contour it (all of them when
    None). Always the organ's place in the body box; with ``checkpoint`` APE queries (``ape_boxes`` edge-points:
    the paper's 6 points, or all-voxels: label transfer from every shot voxel; an organ's label counts only among
    the samples of the shots that contour it); with ``bpr_checkpoint`` BPR score intervals. Each organ's method is chosen leave-one-shot-out among
    these and their combinations (:mod:`nnunet_ape.localize.choice`), or is ``method`` for every organ when that is
    not ``auto``."""
    models = _method(checkpoint, bpr_checkpoint)
    if ape_boxes not in APE_BOXES:
        raise InputError(f"--ape-boxes {ape_boxes}: choose one of {', '.join(APE_BOXES)}")
    transfer = checkpoint is not None and ape_boxes == "all-voxels"
    possible = available_methods(checkpoint is not None, bpr_checkpoint is not None, transfer)
    if method != "auto" and method not in possible:
        raise InputError(f"--method {method}: not possible with the models given; choose auto or one of {', '.join(possible)}")
    per_organ, notes = select_shots(cases, organs, shots)
    used = sorted({i for indices in per_organ.values() for i in indices})
    partial = any(indices != used for indices in per_organ.values())
    ape_model = load_ape_model(checkpoint)[0] if checkpoint else None
    bpr_model = load_bpr_model(bpr_checkpoint)[0] if bpr_checkpoint else None
    settings = embed_settings_for(checkpoint) if checkpoint else None
    fits = {o: _OrganShots() for o in organs}
    maps, samples, grids = [], [], []  # per used case: APE map (spilled), label-transfer samples and grid
    with tempfile.TemporaryDirectory(prefix="nnunet-ape-maps-") as store:
        for position, index in enumerate(tqdm(used, desc="reading shots", unit="case")):
            case = cases[index]
            ct, label = read_case(case)
            canon = canonical_ct(ct)  # shots may differ in orientation
            canon_ct, canon_label = canon.canon, canon.array_to_canonical(label)
            body = body_box(canon_ct.array)
            embedding = scored = None
            if ape_model is not None:
                network = network_map(ape_model, canon, settings, device=device, progress=False)
                embedding = canonical_map(network, settings).volume.array
                embedding = outside_to_inf(embedding, search_region(canon_ct.array, canon_ct.spacing))
                maps.append(spill(embedding, Path(store), str(position)))  # disk, not memory
                if transfer:
                    grids.append(body_grid(body, canon_ct.spacing, canon_ct.shape))
                    contoured = [v for o, v in organs.items() if index in per_organ[o]] if partial else None
                    samples.append(LabelSamples.from_shot(embedding, canon_label, grids[-1], list(organs.values()), contoured))
            if bpr_model is not None:
                scored = score_ct(bpr_model, canon, device)
            for organ, value in organs.items():
                if index not in per_organ[organ]:
                    continue
                mask = canon_label == value
                fits[organ].add(case.name, mask, body, embedding, maps[-1] if maps else None, scored)
                if fits[organ].cuts[-1][:, 2].any():
                    notes.append(f"{organ} reaches the first or last slice of case '{case.name}': the scan cuts it, so that "
                                 "end is not a landmark and the box reaches the image border there; prefer shots that show "
                                 "the whole organ")
        held = held_out_boxes(samples, maps, grids, list(organs.values())) if transfer else []
        organ_held = {o: [held[used.index(i)] for i in per_organ[o]] if held else [] for o in organs}  # its shots'
        organ_entries = {organ: fits[organ].entry(value, organ_held[organ], target_recall, combine, ape_model is not None,
                                                  bpr_model is not None, transfer, method)
                         for organ, value in tqdm(organs.items(), desc="calibrating and choosing", unit="organ",
                                                  disable=len(used) < 10)}
        for fit in fits.values():
            fit.maps.clear()
        maps.clear()  # memory maps close before their folder goes
    localizer = {"format": LOCALIZER_FORMAT, "method": models}
    if checkpoint:
        localizer.update({
            "ape_checkpoint": str(Path(checkpoint).resolve()),
            "ape_sha256": file_hash(checkpoint),
            "embed_settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()},
        })
    if bpr_checkpoint:
        localizer.update({"bpr_checkpoint": str(Path(bpr_checkpoint).resolve()), "bpr_sha256": file_hash(bpr_checkpoint)})
    localizer.update({"combine": combine, "target_recall": target_recall, "shots": [cases[i].name for i in used],
                      "warnings": notes})
    if checkpoint:
        localizer["ape_boxes"] = ape_boxes
    if transfer:
        pooled = LabelSamples.pooled(samples)
        localizer["label_transfer"] = {"k": DEFAULT_K, "threshold": DEFAULT_THRESHOLD, "step_mm": DEFAULT_STEP_MM,
                                       "labels": pooled.labels.tolist(), "embeddings": pooled.embeddings.round(4).tolist()}
        if pooled.group_values is not None:  # partially contoured shots: which organs each sample's shot contours
            localizer["label_transfer"].update({"groups": pooled.groups.tolist(), "group_values": pooled.group_values})
    localizer["organs"] = organ_entries
    return localizer


class _OrganShots:
    """What one organ's shots give a localizer: names, masks (cropped), body boxes, APE edge queries and maps, cut
    sides, BPR intervals and scores, all canonical."""

    def __init__(self) -> None:
        self.names, self.masks, self.bodies, self.edges, self.cuts = [], [], [], [], []
        self.maps, self.intervals, self.scored = [], [], []

    def add(self, name: str, mask: np.ndarray, body: np.ndarray, embedding: np.ndarray | None, stored_map, scored) -> None:
        self.names.append(name)
        self.masks.append(CroppedMask(mask))
        self.bodies.append(body)
        self.cuts.append(cut_sides(mask))
        if embedding is not None:
            self.edges.append(shot_queries(embedding, mask))
            self.maps.append(stored_map)
        if scored is not None:
            self.intervals.append(organ_interval(scored.scores, mask))
            self.scored.append(scored)

    def entry(self, value: int, transfer_held: list, target: float, combine: str, ape: bool, bpr: bool, transfer: bool,
              method: str = "auto") -> dict:
        """The organ's localizer entry: label, shots, body box, APE / BPR settings, and the method (chosen
        leave-one-shot-out unless ``method`` names one) with each candidate's held-out scores (``selection``; None
        with one shot)."""
        k = len(self.masks)
        entry: dict = {"label": int(value), "shot_cases": self.names}
        held: dict[str, list[np.ndarray]] = {"body_box": held_out_body_boxes(self.masks, self.bodies)}
        needed: dict[str, list[float]] = {}  # per method, each shot's alpha: calibration and selection share them

        calibrated: dict[str, float] = {}  # per method, the stored alpha
        coverage: dict[str, float | None] = {}

        def alpha(method: str) -> float:
            needed[method] = shot_alphas(held[method], self.masks, target)
            calibrated[method], coverage[method] = calibrated_alpha(needed[method], DEFAULT_ALPHA)
            return calibrated[method]

        entry["body_box"] = {"relative": mean_relative_box(self.masks, self.bodies).round(5).tolist(), "alpha": alpha("body_box")}
        if ape:
            held["ape"] = [held_out_box(self.edges, self.maps[i], i, combine, self.cuts) for i in range(k)] if k > 1 else []
            entry["alpha"] = alpha("ape")
            entry["alpha_calibrated"] = k > 1  # leave-one-shot-out needs a second shot
            if transfer:
                entry["edge_points_alpha"] = entry["alpha"]  # for the fallback to edge points
                held["ape_all"] = [b[value] if b[value] is not None else edge for b, edge in zip(transfer_held, held["ape"])]
                entry["alpha"] = alpha("ape_all")
            entry["shots"] = [{"case": n, "edge_embeddings": e.round(5).tolist(), "cut_sides": cut.tolist()}
                              for n, e, cut in zip(self.names, self.edges, self.cuts)]
        if bpr:
            margin = calibrate_margin(self.intervals, self.scored, self.masks, target, combine)
            entry["bpr"] = {"margin": margin, "intervals": [iv.round(5).tolist() for iv in self.intervals]}
        entry["selection"] = None
        if k > 1:
            scores = (self.intervals, self.scored, lambda ivs: combine_intervals(ivs, combine)) if bpr else None
            entry["selection"] = selection_scores(self.masks, held, target, "ape_all" if transfer else "ape", scores, needed)
        if method != "auto":
            entry["method"] = method
        else:
            entry["method"] = choose(entry["selection"]) if entry["selection"] else default_method(ape, bpr, transfer)
        agreement = shot_agreement(held, calibrated, self.masks, entry["method"]) if k > 1 else None
        if entry["method"] in coverage:  # a box method: the share of new cases its enlargement is expected to cover
            entry["coverage"] = None if coverage[entry["method"]] is None else round(coverage[entry["method"]], 4)
        if agreement is not None:
            entry["safety_net"] = {"agreement": round(agreement, 4)}
        return entry


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


def _transfer_neighbours(localizer: dict, canon_ct: Volume, body: np.ndarray, canon_map: np.ndarray) -> Neighbours:
    """Neighbour labels of the canonical map's body grid (``body``: the canonical CT's body box) among the
    localizer's stored shot samples."""
    stored = localizer["label_transfer"]
    groups = np.asarray(stored["groups"], dtype=np.int32) if "groups" in stored else None
    samples = LabelSamples(np.asarray(stored["embeddings"], dtype=np.float32), np.asarray(stored["labels"], dtype=np.int32),
                           groups, stored.get("group_values"))
    grid = body_grid(body, canon_ct.spacing, canon_ct.shape, stored["step_mm"])
    return LabelTransfer(samples, stored["k"]).neighbours(canon_map, grid)


def _ape_boxes(entry: dict, canon_map: np.ndarray, combine: str, neighbours: Neighbours | None, threshold: float) -> dict:
    """Canonical boxes of one organ: ``box`` (label transfer with ``neighbours``, else or where it finds nothing the
    edge points), ``enlarged``, the edge points' own ``edge_enlarged`` and ``per_shot`` boxes; ``how`` says which
    method gave the box."""
    edges = [np.asarray(s["edge_embeddings"], dtype=np.float64) for s in entry["shots"]]
    cuts = [np.asarray(s.get("cut_sides", np.zeros((2, 3))), dtype=bool) for s in entry["shots"]]
    box, per_shot = predict_box(edges, canon_map, combine, cuts)
    edge_alpha = entry.get("edge_points_alpha", entry["alpha"])
    edge_enlarged = enlarge_box(box, edge_alpha, canon_map.shape[:3])
    how, alpha = "edge-points", edge_alpha
    found = neighbours.organ_box(entry["label"], threshold) if neighbours is not None else None
    if found is not None:
        box, how, alpha = found, "all-voxels", entry["alpha"]
    return {"box": box, "enlarged": enlarge_box(box, alpha, canon_map.shape[:3]), "edge_enlarged": edge_enlarged,
            "per_shot": per_shot, "how": how, "alpha": alpha}


def map_stride(ct_spacing: tuple[float, ...], model_spacing: tuple[float, ...], most: int = 4) -> int:
    """The coarsest stride (1..``most``) at which a map sampled on every stride-th CT voxel is still no coarser than
    the model's own grid along any axis: boxes need no finer map than that (and it is many times cheaper)."""
    return int(max(1, min(most, np.floor(min(m / c for m, c in zip(model_spacing, ct_spacing)) + 1e-6))))


def strided_to_full(box: np.ndarray, stride: int) -> np.ndarray:
    """A float box in the CT's own axes, in the voxels of a strided map (voxel j on CT voxel ``stride * j``) -> CT
    voxels, the high corner widened to the last CT voxel of its map cell (so that the box is not cut by the
    sampling)."""
    steps = np.full(3, float(stride))
    return np.stack([box[0] * steps, box[1] * steps + steps - 1])


def searchable_map(embedding: CanonicalMap) -> np.ndarray:
    """The canonical APE map's array ``(X', Y', Z', C)``, +inf outside the CT's body (grown by the search margin,
    :func:`~nnunet_ape.localize.body.search_region`) so that retrieval never answers from the air around it. The
    region is found on the map's own voxels: ``embedding`` may be a map on every stride-th CT voxel."""
    step = embedding.stride
    hu = embedding.ct.canon.array[tuple(slice(first, None, step) for first in embedding.start)]
    return outside_to_inf(embedding.volume.array, search_region(hu, embedding.volume.spacing))


def predict_organ_boxes(localizer: dict, ct: Volume | CanonicalCT, embedding: CanonicalMap | Volume | None = None,
                        scored: ScoredCT | None = None, organs: list[str] | None = None, safety_nets: bool = True) -> dict:
    """Boxes per organ on a CT (HU, any orientation, or a :class:`~nnunet_ape.canonical.CanonicalCT`), in its own
    voxel indices and in mm. APE (with ``embedding``, the map: a :class:`~nnunet_ape.embed.CanonicalMap` of the CT,
    or a map on the CT's own grid as ``embed_volume`` returns it): ``box`` (retrieved) and ``enlarged_box``; BPR
    (with ``scored``, the canonical slice scores): ``bpr_z_range`` (slices) and ``bpr_box`` (full x/y); both:
    ``combined_box`` (APE's enlarged x/y, BPR's z). ``crop_box`` is the box to crop with: the combined one when both
    are there, else the enlarged APE or the BPR box. ``embedding`` may be a map on every stride-th voxel (edge-point
    localizers only): boxes are still in the CT's voxels. Boxes are found in canonical order and converted to the
    CT's own indices once each, here. ``crop_boxes_voxels``: the crop box of every method this CT allows (the
    alternatives to the organ's own method, by name as in :data:`~nnunet_ape.localize.choice.CANDIDATES`). ``safety_net``: True where
    the organ's crop is the union of its method's and the body box's because they disagreed beyond what the shots
    showed (:func:`~nnunet_ape.localize.choice.safety_net`; ``safety_nets`` False turns it off), with
    ``inside_body_box`` the fraction of the method's crop inside the body box's. ``placed``: False
    when the localizer could not place the organ on this CT (no slice scores in its range, or a crop box wholly
    outside the image); its boxes are then only the nearest guess."""
    names = check_organs(localizer, organs)
    canon = canonical_ct(ct)
    ct = canon.source
    perm, flip = canon.orientation.perm, canon.orientation.flip
    canon_shape = canon.canon.shape
    if isinstance(embedding, Volume):  # a map on the CT's own grid
        embedding = CanonicalMap.from_source_grid(embedding, canon)
    canon_map = searchable_map(embedding) if embedding is not None else None
    body = body_box(canon.canon.array)  # every organ's alternative and safety net, whatever its method
    neighbours = None
    if canon_map is not None and localizer.get("ape_boxes") == "all-voxels":
        if embedding.stride != 1:
            raise ValueError("the all-voxels localizer needs the APE map on the CT's own grid (stride 1)")
        neighbours = _transfer_neighbours(localizer, canon.canon, body, canon_map)
    native = canon.box_to_source
    from_map = native
    if embedding is not None and embedding.stride != 1:  # a map on every stride-th voxel: boxes in CT voxels
        strided_shape = embedding.source_shape
        from_map = lambda b: strided_to_full(box_from_canonical(b, perm, flip, strided_shape), embedding.stride)  # noqa: E731
    methods = {organ: localizer["organs"][organ].get("method") or _legacy_method(localizer["organs"][organ], localizer)
               for organ in names}
    out = {}
    for organ in names:
        entry = localizer["organs"][organ]
        result: dict = {"label": entry["label"], "method": methods[organ]}
        crops: dict[str, np.ndarray] = {}  # native (CT voxel) crop box of each method this CT allows
        placed = True
        if canon_map is not None and "shots" in entry:
            found = _ape_boxes(entry, canon_map, localizer["combine"], neighbours, localizer.get("label_transfer", {}).get("threshold", 0))
            box, big = from_map(found["box"]), from_map(found["enlarged"])
            result.update({"ape_boxes": found["how"], "alpha": found["alpha"], "box_voxels": box.round(2).tolist(),
                           "box": _corners_mm(ct, box), "enlarged_box_voxels": big.round(2).tolist(),
                           "enlarged_box": _corners_mm(ct, big),
                           "edge_points_per_shot_box_voxels": [from_map(b).tolist() for b in found["per_shot"]]})
            crops["ape"] = from_map(found["edge_enlarged"])
            crops["ape_all"] = big
        if "body_box" in entry:
            canon_body = enlarge_box(box_in_body(entry["body_box"]["relative"], body), entry["body_box"]["alpha"], canon_shape)
            crops["body_box"] = native(canon_body)
            result.update({"body_box_voxels": crops["body_box"].round(2).tolist(), "body_box": _corners_mm(ct, crops["body_box"])})
        if scored is not None and "bpr" in entry:
            interval = combine_intervals([np.asarray(iv) for iv in entry["bpr"]["intervals"]], localizer["combine"])
            low, high = z_range(scored.scores, interval, entry["bpr"]["margin"])
            bpr_placed = bool(in_range(scored.scores, interval, entry["bpr"]["margin"]).any())
            canon_z = z_box(canon_shape, low, high)
            crops["bpr_z"] = native(canon_z)
            result.update({"bpr_margin": entry["bpr"]["margin"], "bpr_z_range": [low, high],
                           "bpr_box_voxels": crops["bpr_z"].round(2).tolist(), "bpr_box": _corners_mm(ct, crops["bpr_z"])})
            for combined, xy in (("ape_bpr", "ape_all"), ("body_bpr", "body_box")):
                if xy in crops:
                    crops[combined] = native(with_z(canon.box_to_canonical(crops[xy]), low, high))
            if "ape_bpr" in crops:
                result.update({"combined_box_voxels": crops["ape_bpr"].round(2).tolist(), "combined_box": _corners_mm(ct, crops["ape_bpr"])})
            placed = bpr_placed or "bpr" not in methods[organ]
        if methods[organ] not in crops:
            raise InputError(f"organ '{organ}': its method {methods[organ]} needs a model this localization was not given")
        crop = crops[methods[organ]]
        if "safety_net" in entry and "body_box" in crops and safety_nets:
            crop, inside, used = safety_net(crop, crops["body_box"], entry["safety_net"]["agreement"])
            result.update({"inside_body_box": None if inside is None else round(inside, 4), "safety_net": used})
        placed = placed and overlaps_image(crop, ct.shape)
        result.update({"crop_box_voxels": crop.round(2).tolist(), "crop_box": _corners_mm(ct, crop), "placed": placed,
                       "crop_boxes_voxels": {m: b.round(2).tolist() for m, b in crops.items()}})
        out[organ] = result
    return out


def _legacy_method(entry: dict, localizer: dict) -> str:
    """The crop method of a localizer entry written before methods were chosen per organ (no ``method``): the
    combination of its models, APE's box being label transfer where the localizer has it."""
    has_ape, has_bpr = "shots" in entry, "bpr" in entry
    return "ape_bpr" if has_ape and has_bpr else ("ape_all" if has_ape else "bpr_z")


def localize_volume(localizer: dict, ct: Volume | CanonicalCT, ape_model: nn.Module | None = None,
                    bpr_model: nn.Module | None = None, device: str = "cpu", organs: list[str] | None = None) -> dict:
    """Embed and/or score a CT (HU, any orientation) with the localizer's models (from :func:`load_localizer`'s
    checkpoints) and predict its organ boxes (:func:`predict_organ_boxes`), all in canonical order: the CT is
    brought there once, the boxes back once."""
    ct = canonical_ct(ct)
    embedding = scored = None
    if ape_model is not None:
        settings = EmbedSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in localizer["embed_settings"].items()})
        embedding = canonical_map(network_map(ape_model, ct, settings, device=device, progress=False), settings)
    if bpr_model is not None:
        scored = score_ct(bpr_model, ct, device)
    return predict_organ_boxes(localizer, ct, embedding, scored, organs)
