"""The crop stages of the head-and-neck segmentation benchmark (``bench_headneck_segmentation.py``): organ groups,
their crop configurations, localized and oracle prediction.

Groups (one nnU-Net model each): the cohort's 7 organs form three neighbourhoods, and a model per neighbourhood
sees each organ with the structures around it while 3 models (instead of 7) keep the crop stage's training within
the full-image model's on 2 cores:

- ``jaw``: parotid_right, parotid_left, mandible (the parotids lie against the mandible's rami);
- ``cns``: brainstem, spinal_cord (one posterior midline column; the brainstem continues into the cord);
- ``neck``: larynx, esophagus (the anterior neck; the esophagus starts behind the larynx).

Crop configurations come from the project's own commands, as a user makes them: ``nnunet-ape plan --union`` per
group on the reduced plans, ``nnunet-ape preprocess`` for the three together (nnU-Net's planner re-plans each
crop's patch and network for the crops' median shape), then the same CPU reduction as every other model
(``reduce_configuration``), with the batch size capped at the full-image plan's.

Oracle: the crop models on boxes a perfect localizer would give, on the test cases (regrowth as in localized
prediction): each contoured organ's ground-truth box enlarged as the crop stage's localizer enlarges its own raw
boxes (the stored alpha or face margins of the organ's chosen method), the union over the group. The gap between
the crop stage and this is what localization errors cost. (Until 2026-12-05 the oracle was the ground-truth box
plus the 10 mm training margin: much tighter than any crop the models were trained on, which lost the context
above the brainstem and put it 15-50 voxels too low; brainstem Dice 0.05.)
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

GROUPS = {
    "jaw": ["parotid_right", "parotid_left", "mandible"],
    "cns": ["brainstem", "spinal_cord"],
    "neck": ["larynx", "esophagus"],
}
BASE = "3d_fullres"


def group_configuration(group: str) -> str:
    """The configuration ``nnunet-ape plan --union --organs ...`` names for ``group``."""
    from nnunet_ape.nnunet.ape_plans import configuration_name

    return configuration_name(BASE, GROUPS[group], [])


def cap_batch(config: dict, batch: int) -> dict:
    """``config`` with its batch size at most ``batch`` (the CPU reduction's: the full-image plan's batch)."""
    out = dict(config)
    out["batch_size"] = min(int(config["batch_size"]), int(batch))
    return out


def predict_measured(argv: list[str], record: Path) -> None:
    """Run ``nnunet-ape`` with ``argv`` in this process, then write this process's wall seconds and peak memory to
    ``record`` (JSON). Run it in a process of its own, so the peak is the prediction's."""
    from nnunet_ape.cli.main import main

    began = time.perf_counter()
    main(argv)
    record.write_text(json.dumps({"seconds": round(time.perf_counter() - began, 2),
                                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}))


def localized_timings(out: Path, cases: list[str]) -> dict[str, dict]:
    """Per predicted case, seconds split by stage from ``CASE_boxes.json`` (``nnunet-ape predict``'s report):
    localize (APE pass + boxes), nnU-Net (every model on its crop, regrowth included), rest (read, merge, paste
    back); plus the regrowth and the faces still touched per model."""
    timings = {}
    for case in cases:
        file = out / f"{case}_boxes.json"
        if not file.exists():
            continue
        report = json.loads(file.read_text())
        seconds = report["seconds"]
        models = report["models"]
        nnunet = sum(m.get("seconds", 0.0) for m in models)
        localize = seconds.get("localize", 0.0)
        timings[case] = {"case": case, "localize": round(localize, 3), "nnunet": round(nnunet, 3),
                         "rest": round(seconds["case"] - localize - nnunet, 3), "case_seconds": seconds["case"],
                         "boxes": {m["model"].split("__")[-1]: {"box_voxels": m.get("box_voxels"), "organs": m["organs"],
                                                               "regrown": m.get("regrown", 0),
                                                               "still_touched_faces": m.get("still_touched_faces", []),
                                                               "voxel_ratio": m.get("voxel_ratio")}
                                   for m in models}}
    return timings


def organ_box_fractions(label_file: Path, boxes: dict[str, dict], organs: dict[str, int]) -> dict[str, float]:
    """Per organ contoured in ``label_file``: the fraction of its voxels inside the final box of the model that
    segments it (``boxes`` from :func:`localized_timings`; boxes in the label's x/y/z voxels). An organ whose model
    was skipped counts 0."""
    from nnunet_ape.crop_geometry import fraction_inside
    from nnunet_ape.io import read_volume

    label = read_volume(label_file).array
    out = {}
    for entry in boxes.values():
        for organ in entry["organs"]:
            mask = label == organs[organ]
            if not mask.any():
                continue
            box = entry["box_voxels"]
            out[organ] = 0.0 if box is None else round(float(fraction_inside(mask, np.asarray(box))), 4)
    return out


# ---------------------------------------------------------------------------------------------------------- oracle

def oracle_box(label, values: list[int], localizer: dict) -> np.ndarray | None:
    """The oracle crop box ``(2, 3)`` (inclusive float voxel indices of ``label``'s grid, as a localizer gives them)
    of the organs ``values``: each contoured organ's ground-truth box enlarged by ``localizer``'s enlargement of its
    chosen method (in canonical space, as the localizer applies it), their union; None when the case contours none
    of them. ``label``: the case's label :class:`~nnunet_ape.io.Volume`."""
    from nnunet_ape.canonical import canonical_ct
    from nnunet_ape.localize.boxes import mask_box
    from nnunet_ape.localize.margins import enlarge, stored_enlargement

    canon = canonical_ct(label)
    array, spacing = canon.canon.array, canon.canon.spacing
    entries = {e["label"]: e for e in localizer["organs"].values()}
    boxes = []
    for value in values:
        mask = array == value
        if value not in entries or not mask.any():
            continue
        entry = entries[value]
        crop = enlarge(mask_box(mask), stored_enlargement(entry, entry["method"]), array.shape, spacing)
        boxes.append(canon.box_to_source(crop))
    if not boxes:
        return None
    return np.stack([np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)])


def oracle_predictor_class():
    """A :class:`LocalizedPredictor` whose crop models take the oracle box of the current case's label map
    (``self.label``, set before each case) instead of the localizer's; no APE pass."""
    from nnunet_ape.nnunet.localized_predict import LocalizedPredictor

    class OraclePredictor(LocalizedPredictor):
        label = None  # Volume of the current case's labels

        def __post_init__(self) -> None:
            self.feature_models = [None] * len(self.models)

        localizer = None  # the crop stage's localizer (its enlargement per organ)

        def _first_box(self, model, features, ct):
            box = oracle_box(self.label, list(model.to_output), self.localizer)
            if box is None:
                return {"model": model.name, "kind": model.kind, "organs": model.organs, "skipped": "no organ contoured"}, None
            boxes = {o: {"crop_box_voxels": box.tolist(), "placed": True, "method": "oracle"} for o in model.organs}
            return super()._first_box(model, SimpleNamespace(boxes=boxes, channels=None), ct)

    return OraclePredictor


def predict_oracle(dataset: str, configurations: list[str], trainer: str, plans: str, images: list[Path],
                   labels_dir: Path, out: Path, device: str, tta: bool, localizer: Path) -> None:
    """Predict ``images`` (``CASE_0000.nii.gz``) with the crop models of ``configurations`` on their oracle boxes
    (labels from ``labels_dir``, enlarged as ``localizer`` enlarges its boxes), merged and pasted back as
    ``nnunet-ape predict`` does, into ``out`` (``CASE.nii.gz`` + ``CASE_boxes.json``); finished cases are skipped."""
    from nnunet_ape.io import read_channels, read_volume
    from nnunet_ape.nnunet.localized_predict import PredictOptions, is_done, write_case
    from nnunet_ape.nnunet.trained_model import PredictorOptions, open_model, results_folder

    options = PredictorOptions(use_mirroring=tta, device=device)
    models = [open_model(results_folder(dataset, trainer, plans, c), ["0"], "checkpoint_final.pth", options)
              for c in configurations]
    predictor = oracle_predictor_class()(models, device, PredictOptions())
    predictor.localizer = json.loads(Path(localizer).read_text())
    out.mkdir(parents=True, exist_ok=True)
    for image in images:
        case = image.name[: -len("_0000.nii.gz")]
        if is_done(out, case, ".nii.gz"):
            continue
        began = time.perf_counter()
        channels = read_channels([image])
        predictor.label = read_volume(labels_dir / f"{case}.nii.gz")
        result = predictor.predict_case(channels)
        result.report["seconds"]["case"] = round(time.perf_counter() - began, 3)
        write_case(result, out, case, ".nii.gz", [image])
        print(f"  {case}: {result.report['seconds']['case']:.1f} s", flush=True)
