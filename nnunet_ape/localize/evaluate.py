"""The paper's localization protocol (DESIGN section 2) with a body-box baseline measured in the same run.

Cases are split into folds of k shots (shots = cases k*f .. k*f+k-1, tests = every other case); per organ and
fold: landmark retrieval errors for every shot-test pair (centre of mass, 6 edge points), the k-shot box (IoU
with the true box), and enlargements: the paper's VR@99 (alpha chosen per organ on the test cases so that every
test case keeps >= 99% of the organ) and the deployable alpha calibrated on the shots (leave-one-shot-out).
Box methods: the paper's 6 edge points, label transfer over all shot voxels (beyond the paper), the body-box
baseline, and with a BPR model its z-range alone and with APE's x/y.
Everything is computed in canonical (LPS) index space; metrics do not depend on orientation.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from nnunet_ape.embed import EmbedSettings, embed_volume
from nnunet_ape.io import Volume, to_canonical
from nnunet_ape.localize.boxes import (
    alpha_for_recall,
    box_iou,
    box_recall,
    calibrated_alpha,
    edge_points,
    enlarge_box,
    mask_box,
    shot_alphas,
    volume_ratio,
)
from nnunet_ape.localize.body import SEARCH_MARGIN_MM, body_box, search_region
from nnunet_ape.localize.margins import calibrated_margins, enlarge, face_scale, shot_ts
from nnunet_ape.localize.choice import (
    CANDIDATES,
    TITLES as CHOICE_TITLES,
    box_in_body,
    choose,
    default_method,
    held_out_body_boxes,
    mean_relative_box,
    selection_scores,
    with_z,
)
from nnunet_ape.cases import LabeledCase, read_case
from nnunet_ape.localize.fewshot import (
    DEFAULT_ALPHA,
    DEFAULT_COMBINE,
    cut_sides,
    held_out_box,
    point_queries,
    predict_box,
    shot_queries,
)
from nnunet_ape.localize.label_transfer import (
    LabelSamples,
    LabelTransfer,
    body_grid,
    held_out_boxes,
)
from nnunet_ape.localize.retrieval import nearest_voxels, outside_to_inf
from nnunet_ape.localize.store import spill
from nnunet_ape.localize.zrange import ScoredCT, calibrate_margin, combine_intervals, organ_interval, score_ct, z_box, z_range

METHODS = ("ape", "ape_all", "body_box")
BPR_METHODS = ("bpr_z", "ape_bpr")
# methods with a deployable (shot-calibrated) enlargement; "chosen": each fold's per-organ choice among the others
CALIBRATED = ("ape", "ape_all", "body_box", "bpr_z", "ape_bpr", "body_bpr", "chosen")
TITLES = {**CHOICE_TITLES, "chosen": "chosen per organ"}


@dataclass(eq=False)
class PreparedCase:
    """A case in canonical orientation: CT geometry, APE map ``(X, Y, Z, 3)``, label array, body box, and the
    BPR slice scores when a BPR model was given.

    Only ``ct``'s geometry is used after preparation; :func:`prepare` leaves a placeholder array there that takes
    no memory, and may hand the embedding over as a read-only memory map.
    """

    name: str
    ct: Volume
    embedding: np.ndarray
    label: np.ndarray
    body: np.ndarray
    scored: ScoredCT | None = None


def geometry_only(volume: Volume) -> Volume:
    """The volume's geometry with a zero-memory placeholder array of its shape (``index_to_physical`` works)."""
    return volume.with_array(np.broadcast_to(np.zeros((), np.uint8), volume.shape))


def prepare(
    case: LabeledCase, model, settings: EmbedSettings, device: str, bpr_model=None, store: Path | None = None,
    search_margin_mm: float | None = SEARCH_MARGIN_MM,
) -> PreparedCase:
    """Read, embed (and score, with ``bpr_model``) and reorient one labeled case. The CT's voxels are not kept.

    With ``store`` (a folder) the embedding is written there as ``NAME.npy`` and opened as a read-only memory map,
    so a data set's maps need disk, not memory. The map is +inf outside the body grown by ``search_margin_mm``
    (:func:`~nnunet_ape.localize.body.search_region`), as :mod:`nnunet_ape.localize.predict_boxes` searches it;
    None searches the whole image (what the project did before 2026-12-05, for comparison).
    """
    ct, label = read_case(case)
    embedding = embed_volume(model, ct, settings, device=device, progress=False)
    canon_ct, _ = to_canonical(ct)
    canon_emb = np.ascontiguousarray(to_canonical(embedding)[0].array)
    del embedding
    if search_margin_mm is not None:
        canon_emb = outside_to_inf(canon_emb, search_region(canon_ct.array, canon_ct.spacing, search_margin_mm))
    canon_label, _ = to_canonical(ct.with_array(label))
    scored = score_ct(bpr_model, canon_ct, device) if bpr_model is not None else None
    if store is not None:
        canon_emb = spill(canon_emb, store, case.name)
    body = body_box(canon_ct.array)
    return PreparedCase(case.name, geometry_only(canon_ct), canon_emb, np.ascontiguousarray(canon_label.array), body, scored)


def case_grid(case: PreparedCase):
    """The label-transfer sampling grid of a prepared case (inside its body box)."""
    return body_grid(case.body, case.ct.spacing, case.label.shape)


class TransferBoxes:
    """Label-transfer boxes of every organ in ``values`` for (shots, test) pairs of prepared cases: one neighbour
    search per pair serves all organs, and only the boxes are kept (a fold's kd-tree is kept until the next fold)."""

    def __init__(self, values: list[int]):
        self.values = [int(v) for v in values]
        self._boxes: dict[tuple, dict[int, np.ndarray | None]] = {}
        self._held: dict[tuple, list[dict[int, np.ndarray | None]]] = {}
        self._fold: tuple[tuple, LabelTransfer] | None = None

    def _samples(self, case: PreparedCase) -> LabelSamples:
        present = [v for v in self.values if (case.label == v).any()]  # an uncontoured organ is 0 in the label map
        return LabelSamples.from_shot(case.embedding, case.label, case_grid(case), self.values, present)

    def boxes(self, train: list[PreparedCase], test: PreparedCase) -> dict[int, np.ndarray | None]:
        """``{value: box (2, 3) or None}`` on ``test`` from the samples of ``train``."""
        fold = tuple(id(c) for c in train)
        if (fold, id(test)) not in self._boxes:
            if self._fold is None or self._fold[0] != fold:
                self._fold = (fold, LabelTransfer(LabelSamples.pooled([self._samples(c) for c in train])))
            neighbours = self._fold[1].neighbours(test.embedding, case_grid(test))
            self._boxes[fold, id(test)] = {v: neighbours.organ_box(v) for v in self.values}
        return self._boxes[fold, id(test)]

    def held_out(self, train: list[PreparedCase]) -> list[dict[int, np.ndarray | None]]:
        """Per shot, its boxes found from the other shots (:func:`~nnunet_ape.localize.label_transfer.held_out_boxes`)."""
        fold = tuple(id(c) for c in train)
        if fold not in self._held:
            self._held[fold] = held_out_boxes([self._samples(c) for c in train], [c.embedding for c in train],
                                              [case_grid(c) for c in train], self.values)
        return self._held[fold]


def _mm(case: PreparedCase, index: np.ndarray) -> np.ndarray:
    return case.ct.index_to_physical(np.asarray(index, dtype=np.float64))


def _fold_boxes(train: list[PreparedCase], value: int, target: float, combine: str, transfer: TransferBoxes | None,
                enlargement: str = "margins"):
    """Per-fold predictors: returns (edge queries per shot, the held-out selection scores on the shots (None with
    one shot), the method chosen on them, and a function test -> ({method: raw box}, {method: calibrated crop box})).
    An organ label transfer does not find falls back to the 6-point box (as the localizer does); ``transfer`` None:
    no label transfer (no ``ape_all``). The choice is the localizer's (:mod:`nnunet_ape.localize.choice`), made
    leave-one-shot-out on this fold's shots; its crop is measured as ``chosen``. APE x/y with BPR z uses the
    label-transfer box when there is one, as the localizer does. Crops grow by ``enlargement`` as ``localize fit``
    calibrates it (face margins from two shots on, else alpha)."""
    masks = [c.label == value for c in train]
    bodies = [c.body for c in train]
    edges = [shot_queries(c.embedding, m) for c, m in zip(train, masks)]
    cuts = [cut_sides(m) for m in masks]
    k = len(train)
    held = {"body_box": held_out_body_boxes(masks, bodies),
            "ape": [held_out_box(edges, c.embedding, i, combine, cuts) for i, c in enumerate(train)] if k > 1 else []}
    if transfer is not None:
        held["ape_all"] = [b[value] if b[value] is not None else edge for b, edge in zip(transfer.held_out(train), held["ape"])]
    spacings = [c.ct.spacing for c in train]
    scales = None
    if enlargement == "margins" and k > 1:
        scales = {m: face_scale(boxes, [mask_box(mask) for mask in masks], spacings) for m, boxes in held.items()}
        needed = {m: shot_ts(boxes, masks, scales[m], spacings, target) for m, boxes in held.items()}
        alphas = {m: calibrated_margins(ts, scales[m])[0] for m, ts in needed.items()}
    else:
        needed = {m: shot_alphas(boxes, masks, target) for m, boxes in held.items()}
        alphas = {m: calibrated_alpha(a, DEFAULT_ALPHA)[0] for m, a in needed.items()}
    xy = "ape" if transfer is None else "ape_all"
    relative = mean_relative_box(masks, bodies)
    use_bpr = all(c.scored is not None for c in train)
    if use_bpr:
        intervals = [organ_interval(c.scored.scores, m) for c, m in zip(train, masks)]
        interval = combine_intervals(intervals, combine)
        margin = calibrate_margin(intervals, [c.scored for c in train], masks, target, combine)
    if k > 1:
        scores = (intervals, [c.scored for c in train], lambda ivs: combine_intervals(ivs, combine)) if use_bpr else None
        selection = selection_scores(masks, held, target, xy, scores, needed, scales, spacings)
        chosen = choose(selection, k)
    else:
        selection, chosen = None, default_method(True, use_bpr, transfer is not None)

    def predict(test: PreparedCase, found: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Raw and crop boxes on ``test``; ``found``: the voxels of the shots' edge queries on its map."""
        shape, spacing = test.label.shape, test.ct.spacing
        ape, _ = predict_box(edges, test.embedding, combine, cuts, found)
        body = box_in_body(relative, test.body)
        raw = {"ape": ape, "body_box": body}
        crops = {"ape": enlarge(ape, alphas["ape"], shape, spacing), "body_box": enlarge(body, alphas["body_box"], shape, spacing)}
        if transfer is not None:
            transferred = transfer.boxes(train, test)[value]
            raw["ape_all"] = ape if transferred is None else transferred
            crops["ape_all"] = enlarge(raw["ape_all"], alphas["ape_all"], shape, spacing)
        if use_bpr and test.scored is not None:
            z_raw, z_crop = z_range(test.scored.scores, interval), z_range(test.scored.scores, interval, margin)
            raw.update({"bpr_z": z_box(shape, *z_raw), "ape_bpr": with_z(raw[xy], *z_raw)})
            crops.update({"bpr_z": z_box(shape, *z_crop), "ape_bpr": with_z(crops[xy], *z_crop),
                          "body_bpr": with_z(crops["body_box"], *z_crop)})
        if chosen in crops:
            crops["chosen"] = crops[chosen]
        return raw, crops

    return edges, selection, chosen, predict


def evaluate_organ(cases: list[PreparedCase], value: int, shots: int, target: float = 0.99, combine: str = DEFAULT_COMBINE,
                   transfer: TransferBoxes | None = None, max_folds: int | None = None, all_voxels: bool = True,
                   enlargement: str = "margins") -> dict:
    """All metrics of one organ (label ``value``) over the folds; cases lacking the organ are left out. Methods:
    APE's 6 edge points (the paper), APE label transfer over all voxels, the body-box baseline, and with BPR scores
    the BPR z-range (full x/y) and APE x/y with BPR z. ``transfer``: shared by the organs of one data set, so the
    label transfer's neighbour search runs once per (shots, test) pair. ``max_folds``: evaluate the first this many
    folds only (a large cohort has len/shots folds, each testing on every other case). ``all_voxels`` False: leave
    out the label transfer (its neighbour searches are most of the time on large cohorts)."""
    transfer = (transfer if transfer is not None else TransferBoxes([value])) if all_voxels else None
    present = [c for c in cases if (c.label == value).any()]
    folds = max(1, len(present) // shots) if len(present) > shots else 0
    folds = min(folds, max_folds) if max_folds else folds
    rows: dict[str, list] = {"mre_c": [], "mre_ep": []}
    boxes: dict[str, list] = {}
    for fold in range(folds):
        train = present[fold * shots : (fold + 1) * shots]
        tests = [c for c in present if all(c is not t for t in train)]
        edges, selection, chosen, predict = _fold_boxes(train, value, target, combine, transfer, enlargement)
        rows.setdefault("chosen", []).append(chosen)
        fold_crops: dict[str, list] = {}
        centres = [np.round(ndimage.center_of_mass(c.label == value)).astype(int) for c in train]
        centre_queries = np.concatenate([point_queries(shot.embedding, centre[None], shot.label == value)
                                         for shot, centre in zip(train, centres)])
        for test in tests:
            mask = test.label == value
            truth = mask_box(mask)
            true_centre_mm = _mm(test, ndimage.center_of_mass(mask))
            true_edges_mm = _mm(test, edge_points(mask))
            found = nearest_voxels(np.concatenate([centre_queries, *edges]), test.embedding)  # one search per test
            found_centres, found_edges = found[: len(train)], found[len(train) :]
            rows["mre_c"] += np.linalg.norm(_mm(test, found_centres) - true_centre_mm, axis=1).tolist()
            rows["mre_ep"] += np.linalg.norm(_mm(test, found_edges).reshape(len(train), 6, 3) - true_edges_mm, axis=2).ravel().tolist()
            raw, crops = predict(test, found_edges)
            for method, box in raw.items():
                rows.setdefault(f"iou_{method}", []).append(box_iou(box, truth))
                rows.setdefault(f"alpha_{method}", []).append(alpha_for_recall(mask, box, target))
                boxes.setdefault(method, []).append((mask, box))
            for method, box in crops.items():
                recall, vr = box_recall(mask, box), volume_ratio(mask.shape, box)
                rows.setdefault(f"recall_calibrated_{method}", []).append(recall)
                rows.setdefault(f"vr_calibrated_{method}", []).append(vr)
                fold_crops.setdefault(method, []).append((recall, vr))
        rows.setdefault("folds", []).append({
            "shots": [c.name for c in train], "selection": selection, "chosen": chosen,
            "tests": {m: {"recall": round(float(np.mean([r for r, _ in v])), 4), "vr": round(float(np.mean([x for _, x in v])), 2)}
                      for m, v in fold_crops.items()}})
    if not boxes:
        return {"cases": len(present), "evaluated": 0}
    result = {"cases": len(present), "evaluated": len(boxes["ape"]), "folds": folds,
              "chosen": {m: rows["chosen"].count(m) for m in CANDIDATES if m in rows["chosen"]},
              "per_fold": rows["folds"]}
    for key in ("mre_c", "mre_ep"):
        result[key] = [float(np.mean(rows[key])), float(np.std(rows[key]))]
    for method, entries in boxes.items():
        result[f"iou_{method}"] = float(np.mean(rows[f"iou_{method}"]))
        # the paper's VR@99: one alpha per organ, the smallest that keeps >= target of the organ in every test case
        # (a box far off the organ needs one that covers nearly the whole image: VR near 1, no reduction)
        oracle = max(rows[f"alpha_{method}"])
        result[f"alpha99_{method}"] = oracle
        result[f"vr99_{method}"] = float(np.mean([volume_ratio(m.shape, enlarge_box(b, oracle, m.shape)) for m, b in entries]))
    for method in CALIBRATED:
        if f"recall_calibrated_{method}" in rows:
            result[f"recall_calibrated_{method}"] = float(np.mean(rows[f"recall_calibrated_{method}"]))
            result[f"vr_calibrated_{method}"] = float(np.mean(rows[f"vr_calibrated_{method}"]))
    return result


def mean_over_organs(per_organ: dict[str, dict]) -> dict[str, float]:
    """Mean of each metric over the evaluated organs (``evaluate_organ`` results by name); MRE as the mean of the
    organs' means. A metric some evaluated organ lacks (VR@99 where its target was unreachable) gets no mean."""
    done = [r for r in per_organ.values() if r.get("evaluated")]
    if not done:
        return {}
    keys = {k for r in done for k in r if k.startswith(("iou_", "vr99_", "recall_calibrated_", "vr_calibrated_"))}
    mean = {k: float(np.mean([r[k] for r in done])) for k in sorted(keys)
            if all(k in r for r in done)}
    mean["mre_c"] = float(np.mean([r["mre_c"][0] for r in done]))
    mean["mre_ep"] = float(np.mean([r["mre_ep"][0] for r in done]))
    return mean


def evaluate_localization(
    cases: list[LabeledCase], organs: dict[str, int], model, settings: EmbedSettings, shots: int = 5, device: str = "cpu",
    target: float = 0.99, combine: str = DEFAULT_COMBINE, bpr_model=None, max_folds: int | None = None, enlargement: str = "margins",
) -> dict:
    """Run the protocol on labeled cases; returns ``{"organs": {name: metrics}, "mean": {...}, "settings": ...}``.
    With ``bpr_model`` the BPR methods are measured in the same run; the calibrated crops grow by ``enlargement``
    (``localize fit --enlargement``)."""
    with tempfile.TemporaryDirectory(prefix="nnunet-ape-maps-") as store:
        prepared = [prepare(c, model, settings, device, bpr_model, Path(store))
                    for c in tqdm(cases, desc="embedding cases", unit="case")]
        transfer = TransferBoxes(list(organs.values()))
        per_organ = {name: evaluate_organ(prepared, value, shots, target, combine, transfer, max_folds, enlargement=enlargement)
                     for name, value in tqdm(organs.items(), desc="evaluating organs", unit="organ")}
        del prepared  # memory maps close before their folder goes
    methods = [*METHODS, *(BPR_METHODS if bpr_model is not None else ())]
    return {"organs": per_organ, "mean": mean_over_organs(per_organ),
            "settings": {"shots": shots, "target_recall": target, "combine": combine, "cases": len(cases), "methods": methods,
                         "max_folds": max_folds, "enlargement": enlargement}}


def _cell(r: dict, key: str, fmt: str) -> str:
    if isinstance(r.get(key), list):
        return f"{r[key][0]:{fmt}} ± {r[key][1]:{fmt}}"
    if key in r:
        return f"{r[key]:{fmt}}"
    return "-"


def _table(result: dict, columns: list[tuple[str, str, str]]) -> list[str]:
    """Markdown rows: organ, cases, then one column per (title, key, format); the mean row last."""
    lines = ["| organ | cases | " + " | ".join(t for t, _, _ in columns) + " |", "|" + "---|" * (len(columns) + 2)]
    for organ, r in result["organs"].items():
        if not r.get("evaluated"):
            lines.append(f"| {organ} | {r['cases']} | too few cases with this organ |" + " |" * (len(columns) - 1))
            continue
        cells = [_cell(r, k, f) for _, k, f in columns]
        lines.append(f"| {organ} | {r['cases']} | " + " | ".join(cells) + " |")
    m = result["mean"]
    if m:
        lines.append("| **mean** | | " + " | ".join(f"{m[k]:{f}}" if k in m else "-" for _, k, f in columns) + " |")
    return lines


def markdown_tables(result: dict) -> str:
    """The paper's tables 2-4 as Markdown: retrieval error, box IoU and VR@99 per method, and the crops with the
    shot-calibrated enlargement (deployable)."""
    s = result["settings"]
    methods = s.get("methods", list(METHODS))
    lines = [f"# Localization: {s['shots']}-shot, {s['cases']} cases, target recall {s['target_recall']}", "",
             "## Landmark retrieval (APE)", ""]
    lines += _table(result, [("MRE_c (mm)", "mre_c", ".1f"), ("MRE_ep (mm)", "mre_ep", ".1f")])
    lines += ["", "## Boxes: IoU with the true box, VR@99", ""]
    lines += _table(result, [(f"IoU {TITLES[m]}", f"iou_{m}", ".2f") for m in methods]
                    + [(f"VR@99 {TITLES[m]}", f"vr99_{m}", ".1f") for m in methods])
    lines += ["", "## Crops with the shot-calibrated enlargement: recall of the organ, volume ratio", ""]
    calibrated = [m for m in CALIBRATED if m in methods or m in ("body_bpr", "chosen") and
                  any(f"recall_calibrated_{m}" in r for r in result["organs"].values())]
    lines += _table(result, [(f"recall {TITLES[m]}", f"recall_calibrated_{m}", ".3f") for m in calibrated]
                    + [(f"VR {TITLES[m]}", f"vr_calibrated_{m}", ".1f") for m in calibrated])
    lines += ["", "## Chosen methods (folds per method)", "", "| organ | chosen |", "|---|---|"]
    lines += [f"| {o} | " + ", ".join(f"{TITLES[m]} {n}" for m, n in r.get("chosen", {}).items()) + " |"
              for o, r in result["organs"].items() if r.get("evaluated")]
    lines += ["", "VR@99: raw volume / crop volume with one enlargement per organ chosen on the test cases (the paper's "
              "protocol); a box far off the organ needs an enlargement that covers nearly the whole image (VR near 1). "
              "A box thinner than one voxel counts as one voxel thick when enlarged. Calibrated: enlargement "
              "(APE alpha, BPR z margin) chosen on the shots only (leave-one-shot-out), "
              "as at inference. Chosen per organ: in each fold, the method `localize fit` would choose on that fold's shots "
              "(the model's own method when it matched the body box's leave-one-shot-out recall in crops no larger, else the "
              "body box; see Chosen methods), measured on the "
              "test cases. APE 6 points: the paper's edge-point retrieval; APE all voxels: k-nearest-neighbour label "
              "transfer from every shot voxel. BPR z boxes span the full x/y extent.", ""]
    return "\n".join(lines)
