"""Fit a localizer from labeled shots: per organ the APE edge-point queries (or label-transfer samples), BPR score
intervals, the body box, each calibrated leave-one-shot-out, and the method chosen per organ
(:mod:`nnunet_ape.localize.choice`). The file format is :mod:`nnunet_ape.localize.localizer`."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_ape.bpr.scoring import load_bpr_model
from nnunet_ape.canonical import canonical_ct
from nnunet_ape.cases import LabeledCase, label_values, read_case
from nnunet_ape.checkpoint import file_hash, load_ape_model
from nnunet_ape.embed import canonical_map, network_map
from nnunet_ape.errors import InputError
from nnunet_ape.io import read_volume
from nnunet_ape.localize.body import body_box, search_region
from nnunet_ape.localize.boxes import calibrated_alpha, shot_alphas
from nnunet_ape.localize.choice import (
    SAFETY_NET_QUANTILE,
    available_methods,
    choose,
    default_method,
    held_out_body_boxes,
    mean_relative_box,
    selection_scores,
    shot_agreement,
)
from nnunet_ape.localize.fewshot import DEFAULT_ALPHA, DEFAULT_COMBINE, cut_sides, held_out_box, shot_queries
from nnunet_ape.localize.label_transfer import (
    DEFAULT_K,
    DEFAULT_STEP_MM,
    DEFAULT_THRESHOLD,
    LabelSamples,
    body_grid,
    held_out_boxes,
)
from nnunet_ape.localize.localizer import APE_BOXES, LOCALIZER_FORMAT, embed_settings_for
from nnunet_ape.localize.margins import ENLARGEMENTS, face_scale, shot_ts
from nnunet_ape.localize.masks import CroppedMask
from nnunet_ape.localize.retrieval import outside_to_inf
from nnunet_ape.localize.store import spill
from nnunet_ape.localize.zrange import calibrate_margin, combine_intervals, organ_interval, score_ct


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


VOLUME_OUTLIER = 4.0  # a shot's organ this many times larger (or smaller) than the shots' median is flagged


def volume_outliers(names: list[str], volumes: list[float], factor: float = VOLUME_OUTLIER) -> list[tuple[str, float]]:
    """Shots whose organ volume (any unit) is more than ``factor`` times the median of ``volumes``, or less than
    1 / ``factor`` of it: (name, volume / median). Needs 5 shots; on the head-and-neck cohort these were
    contours of other structures (two 'spinal cords' of 19 and 21x the median, one 160 mm wide) or partial ones
    (larynxes of 0.1x)."""
    if len(volumes) < 5:
        return []
    median = float(np.median(volumes))
    return [(n, float(v / median)) for n, v in zip(names, volumes) if median > 0 and (v > factor * median or v * factor < median)]


def fit_localizer(
    cases: list[LabeledCase], organs: dict[str, int], checkpoint: Path | None, device: str = "cpu",
    target_recall: float = 0.99, combine: str = DEFAULT_COMBINE, bpr_checkpoint: Path | None = None, ape_boxes: str = "edge-points",
    shots: int | None = None, method: str = "auto", enlargement: str = "margins",
) -> dict:
    """Fit a localizer on labeled shots: per organ the first ``shots`` of ``cases`` that contour it (all of them when
    None). Always the organ's place in the body box; with ``checkpoint`` APE queries (``ape_boxes`` edge-points:
    the paper's 6 points, or all-voxels: label transfer from every shot voxel; an organ's label counts only among
    the samples of the shots that contour it); with ``bpr_checkpoint`` BPR score intervals. Each organ's method is chosen leave-one-shot-out among
    these and their combinations (:mod:`nnunet_ape.localize.choice`), or is ``method`` for every organ when that is
    not ``auto``. ``enlargement``: how raw boxes become crops, ``margins`` (face margins in mm,
    :mod:`nnunet_ape.localize.margins`) or ``alpha`` (the paper's scaling about the centre); both are calibrated and
    stored, this one is used."""
    models = _method(checkpoint, bpr_checkpoint)
    if enlargement not in ENLARGEMENTS:
        raise InputError(f"--enlargement {enlargement}: choose one of {', '.join(ENLARGEMENTS)}")
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
                fits[organ].add(case.name, mask, body, canon_ct.spacing, embedding, maps[-1] if maps else None, scored)
                if fits[organ].cuts[-1][:, 2].any():
                    notes.append(f"{organ} reaches the first or last slice of case '{case.name}': the scan cuts it, so that "
                                 "end is not a landmark and the box reaches the image border there; prefer shots that show "
                                 "the whole organ")
        for organ, fit in fits.items():
            volumes = [float(m.sum()) * float(np.prod(sp)) / 1000 for m, sp in zip(fit.masks, fit.spacings)]
            notes += [f"{organ}: shot '{name}' contours {ratio:.2g}x the median volume of the organ's shots: check its "
                      "label (the calibration keeps every shot's organ inside its crop, so one contour of another "
                      "structure widens every crop)" for name, ratio in volume_outliers(fit.names, volumes)]
        held = held_out_boxes(samples, maps, grids, list(organs.values())) if transfer else []
        organ_held = {o: [held[used.index(i)] for i in per_organ[o]] if held else [] for o in organs}  # its shots'
        organ_entries = {organ: fits[organ].entry(value, organ_held[organ], target_recall, combine, ape_model is not None,
                                                  bpr_model is not None, transfer, method, enlargement)
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
    localizer.update({"combine": combine, "target_recall": target_recall, "enlargement": enlargement, "shots": [cases[i].name for i in used],
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
    """What one organ's shots give a localizer: names, masks (cropped), body boxes, voxel spacings, APE edge queries
    and maps, cut sides, BPR intervals and scores, all canonical."""

    def __init__(self) -> None:
        self.names, self.masks, self.bodies, self.spacings, self.edges, self.cuts = [], [], [], [], [], []
        self.maps, self.intervals, self.scored = [], [], []

    def add(self, name: str, mask: np.ndarray, body: np.ndarray, spacing, embedding: np.ndarray | None, stored_map,
            scored) -> None:
        self.names.append(name)
        self.masks.append(CroppedMask(mask))
        self.bodies.append(body)
        self.spacings.append(tuple(float(s) for s in spacing))
        self.cuts.append(cut_sides(mask))
        if embedding is not None:
            self.edges.append(shot_queries(embedding, mask))
            self.maps.append(stored_map)
        if scored is not None:
            self.intervals.append(organ_interval(scored.scores, mask))
            self.scored.append(scored)

    def entry(self, value: int, transfer_held: list, target: float, combine: str, ape: bool, bpr: bool, transfer: bool,
              method: str = "auto", enlargement: str = "margins") -> dict:
        """The organ's localizer entry: label, shots, body box, APE / BPR settings, each box method's alpha and (with
        two or more shots) face margins (``margins``), and the method (chosen leave-one-shot-out unless ``method``
        names one) with each candidate's held-out scores (``selection``; None with one shot), all with the
        ``enlargement`` (margins or alpha; with one shot the default alpha)."""
        k = len(self.masks)
        use_margins = enlargement == "margins" and k > 1
        entry: dict = {"label": int(value), "shot_cases": self.names}
        held: dict[str, list[np.ndarray]] = {"body_box": held_out_body_boxes(self.masks, self.bodies)}
        needed: dict[str, list[float]] = {}  # per method, each shot's alpha or t: calibration and selection share them
        scales: dict[str, np.ndarray] = {}  # per method, the margins' shape (margins only)
        calibrated: dict = {}  # per method, the enlargement used: alpha, or margins (2, 3) mm
        coverage: dict[str, float | None] = {}

        def alpha(method: str) -> float:
            alphas = shot_alphas(held[method], self.masks, target)
            stored, alpha_coverage = calibrated_alpha(alphas, DEFAULT_ALPHA)
            if use_margins:
                scales[method] = face_scale(held[method], [m.box() for m in self.masks], self.spacings)
                needed[method] = shot_ts(held[method], self.masks, scales[method], self.spacings, target)
                t, coverage[method] = calibrated_alpha(needed[method], 0.0)  # margins = t x scale (calibrated_margins)
                calibrated[method] = scales[method] * t
                entry.setdefault("margins", {})[method] = {"mm": np.round(calibrated[method], 2).tolist(), "t": round(t, 3),
                                                            "scale_mm": np.round(scales[method], 2).tolist()}
            else:
                needed[method], calibrated[method], coverage[method] = alphas, stored, alpha_coverage
            return stored

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
            entry["selection"] = selection_scores(self.masks, held, target, "ape_all" if transfer else "ape", scores, needed,
                                                  scales if use_margins else None, self.spacings)
        if method != "auto":
            entry["method"] = method
        else:
            entry["method"] = choose(entry["selection"], k) if entry["selection"] else default_method(ape, bpr, transfer)
        agreement = shot_agreement(held, calibrated, self.masks, entry["method"], self.spacings) if k > 1 else None
        if entry["method"] in coverage:  # a box method: the share of new cases its enlargement is expected to cover
            entry["coverage"] = None if coverage[entry["method"]] is None else round(coverage[entry["method"]], 4)
        if agreement is not None:
            entry["safety_net"] = {"agreement": round(agreement, 4), "quantile": SAFETY_NET_QUANTILE}
        return entry
