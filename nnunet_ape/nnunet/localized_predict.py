"""``nnunet-ape predict``: localize, crop, segment with nnU-Net, paste back, for one CT at a time.

Per case: one APE pass and one BPR pass per checkpoint, whatever the number of organs and models
(:func:`nnunet_ape.case_features.case_features` with a shared ``passes`` dict); then each model runs through nnU-Net's
own predictor on its box only (:func:`nnunet_ape.nnunet.region_prediction.predict_region`):

- crop models: the union of the localizer's crop boxes of the model's organs (as its training/test crops were
  made). **No silent cuts**: where the predicted organs touch a box face that is not the image border, that face
  moves outwards (by ``max(regrow_mm, regrow_fraction x the box's extent)``) and the model predicts again, at most
  ``max_regrow`` times; the JSON records every attempt and any face still touched after the last one. An organ the
  localizer cannot place (see ``placed`` in :func:`nnunet_ape.localize.predict_boxes.predict_organ_boxes`) gives a warning
  and is left empty, or with ``fallback_full`` the model runs on the whole image instead;
- whole-image models (embedding channels, or stock nnU-Net: plain nnU-Net prediction) run on the whole image.

**Merging** several models into one label map: each voxel takes the label whose model gives it the highest
probability among the models that predict a foreground label there; a voxel no model labels stays background.
Probabilities (``--save_probabilities``): per output label the highest probability any model gave it (0 outside
that model's box), background = 1 - their sum, clipped to [0, 1].
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_ape.atomic import atomic_path, remove_leftovers
from nnunet_ape.case_features import FeatureModels, case_features, load_feature_models
from nnunet_ape.crop_geometry import box_corners_mm, box_shape, crop_box, slices, union_box
from nnunet_ape.errors import InputError
from nnunet_ape.input_checks import Skipped, check_cases
from nnunet_ape.io import IMAGE_SUFFIXES, Volume, geometry, output_name, read_channels, write_volume
from nnunet_ape.locks import locked
from nnunet_ape.nnunet.region_prediction import RegionPrediction, grow_faces, predict_region, touched_faces
from nnunet_ape.nnunet.trained_model import TrainedModel

MIN_VOXELS = 8
PREDICT_LOCK = ".nnunet_ape_predict.lock"  # in the output folder; byte N is held by the job predicting part N
FACE_NAMES = ("x", "y", "z")
MERGE_RULE = "highest probability of the predicted label among the models that label the voxel; background where none does"


@dataclass
class PredictOptions:
    """What ``predict`` does beyond nnU-Net's predictor settings (see the module docstring)."""

    max_regrow: int = 2
    regrow_mm: float = 20.0
    regrow_fraction: float = 0.25
    fallback_full: bool = False
    save_probabilities: bool = False
    overwrite: bool = False


@dataclass
class CaseResult:
    """One case's output: ``labels`` on the CT's grid (``(X, Y, Z)``, output label values), the report for
    ``CASE_boxes.json``, and per output label its probability ``(X, Y, Z)`` float32 when asked for."""

    labels: Volume
    report: dict
    probabilities: dict[int, np.ndarray] | None = None


@dataclass
class LocalizedPredictor:
    """The models of one ``predict`` run with their localization models, loaded once."""

    models: list[TrainedModel]
    device: str
    options: PredictOptions = field(default_factory=PredictOptions)
    feature_models: list[FeatureModels | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        loaded: dict[str, FeatureModels] = {}
        for model in self.models:
            if model.feature_args is None:
                self.feature_models.append(None)
                continue
            key = repr(sorted(model.feature_args.items()))
            if key not in loaded:
                loaded[key] = load_feature_models(**model.feature_args, device=self.device)
            self.feature_models.append(loaded[key])

    @property
    def source_channels(self) -> int:
        return max(m.source_channels for m in self.models)

    @property
    def output_labels(self) -> dict[str, int]:
        """Output label name -> value over all models; InputError when two models give one value two names."""
        labels: dict[str, int] = {"background": 0}
        by_value = {0: "background"}
        for model in self.models:
            for name, value in model.output_labels.items():
                if value not in model.to_output.values() and value != 0:
                    continue
                if by_value.get(value, name) != name:
                    raise InputError(f"label value {value} is '{by_value[value]}' in one model and '{name}' in "
                                     f"{model.name}; predict models of one source dataset together")
                by_value[value] = name
                labels[name] = value
        return dict(sorted(labels.items(), key=lambda kv: kv[1]))

    def predict_case(self, channels: list[Volume], stage=lambda name: None) -> CaseResult:
        """Predict one CT (``channels``: its source channel Volumes on one grid, channel 0 the CT in HU) with every
        model, merged (module docstring). ``stage(name)`` is called as each stage begins (for progress bars)."""
        ct = channels[0]
        labels = np.zeros(ct.shape, dtype=np.uint16)
        confidence = np.zeros(ct.shape, dtype=np.float32)
        probabilities: dict[int, np.ndarray] | None = {} if self.options.save_probabilities else None
        passes: dict = {}
        seconds: dict[str, float] = {}
        entries = []
        # one APE network pass per checkpoint for all models (case_features' shared passes); channel models first
        order = sorted(range(len(self.models)), key=lambda i: "ape" not in self.models[i].added_channels)
        for model, feature_models in ((self.models[i], self.feature_models[i]) for i in order):
            features = None
            if feature_models is not None:
                stage("localize")
                began = time.perf_counter()
                features = case_features(feature_models, ct, passes)
                seconds["localize"] = seconds.get("localize", 0.0) + time.perf_counter() - began
            stage(model.name.split("__")[-1])
            began = time.perf_counter()
            entry, result, box = self._predict_model(model, features, channels)
            entry["seconds"] = round(time.perf_counter() - began, 3)
            seconds[model.name] = entry["seconds"]
            entries.append(entry)
            if result is None:
                continue
            cut = slices(box)
            better = (result.labels > 0) & (result.confidence > confidence[cut])
            labels[cut][better] = result.labels[better]
            confidence[cut][better] = result.confidence[better]
            if probabilities is not None:
                for value, p in result.probabilities.items():
                    full = probabilities.setdefault(value, np.zeros(ct.shape, dtype=np.float32))
                    np.maximum(full[cut], p, out=full[cut])
        dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
        entries = [entries[order.index(i)] for i in range(len(order))]  # back in the order the models were given
        report = {"models": entries, "merge_rule": MERGE_RULE if len(self.models) > 1 else "one model",
                  "image": geometry(ct),
                  "labels": self.output_labels, "seconds": {k: round(v, 3) for k, v in seconds.items()}}
        return CaseResult(ct.with_array(labels.astype(dtype)), report, probabilities)

    def _predict_model(self, model: TrainedModel, features, channels: list[Volume]):
        ct = channels[0]
        whole = np.array([[0, 0, 0], list(ct.shape)], dtype=np.int64)
        entry: dict = {"model": model.name, "kind": model.kind, "organs": model.organs}
        added = features.channels if features is not None else None
        box = whole
        if model.crops:
            boxes = features.boxes
            entry["localizer"] = {o: {k: boxes[o][k] for k in ("crop_box_voxels", "crop_box", "placed", "method", "ape_boxes", "alpha", "bpr_z_range")
                                      if k in boxes[o]} for o in model.organs}
            placed = [o for o in model.organs if boxes[o]["placed"]]
            unplaced = [o for o in model.organs if not boxes[o]["placed"]]
            if unplaced:
                what = "predicted on the whole image instead" if self.options.fallback_full else \
                    "left empty (--fallback-full predicts the whole image instead)"
                tqdm.write(f"warning: the localizer could not place {', '.join(unplaced)} on this CT; {what}", file=sys.stderr)
                entry["unplaced"] = unplaced
            if unplaced and self.options.fallback_full:
                entry["fallback"] = "whole image"
            elif not placed:
                entry["skipped"] = "no organ placed"
                return entry, None, None
            else:
                box = None
                for organ in placed:
                    organ_box = crop_box(np.asarray(boxes[organ]["crop_box_voxels"]), ct.shape)
                    box = organ_box if box is None else union_box(box, organ_box)
        attempts = []
        while True:
            result = predict_region(model, channels, added, box, self.options.save_probabilities)
            faces = touched_faces(result.labels > 0, box, ct.shape) if model.crops else []
            attempts.append({"box_voxels": box.tolist(), "touched_faces": [f"{FACE_NAMES[a]}-{'low' if s == 0 else 'high'}" for a, s in faces]})
            if not faces or len(attempts) > self.options.max_regrow:
                break
            box = grow_faces(box, faces, self.options.regrow_mm, self.options.regrow_fraction, ct.spacing, ct.shape)
        entry.update({"box_voxels": box.tolist(), "box": box_corners_mm(ct, box), "box_shape": list(box_shape(box)),
                      "voxel_ratio": round(float(np.prod(ct.shape) / np.prod(box_shape(box))), 2),
                      "attempts": attempts, "regrown": len(attempts) - 1,
                      "still_touched_faces": attempts[-1]["touched_faces"],
                      "empty": not bool((result.labels > 0).any())})
        if entry["still_touched_faces"]:
            tqdm.write(f"warning: {model.name}: the prediction still touches the crop faces {', '.join(entry['still_touched_faces'])} "
                       f"after {entry['regrown']} regrowth(s); raise --max-regrow", file=sys.stderr)
        return entry, result, box


def source_channel_files(image: Path, n: int) -> list[Path]:
    """The ``n`` channel files of a case given by its first one (nnU-Net naming ``CASE_0000<ending>``, the others
    ``CASE_0001`` ... beside it). InputError when a channel is missing."""
    if n == 1:
        return [image]
    name = image.name
    ending = next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), "")
    stem = name[: len(name) - len(ending)]
    if not (len(stem) > 5 and stem[-5] == "_" and stem[-4:] == "0000"):
        raise InputError(f"{image}: the model reads {n} image channels; name the files CASE_0000{ending} .. CASE_{n - 1:04d}{ending}")
    files = [image.with_name(f"{stem[:-4]}{k:04d}{ending}") for k in range(n)]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise InputError(f"{missing[0]}: missing channel file (the model reads {n} image channels)")
    return files


def write_case(result: CaseResult, output: Path, case: str, ending: str, inputs: list[Path]) -> None:
    """Write ``CASE<ending>`` (label map), ``CASE.npz`` (probabilities, when present) and ``CASE_boxes.json`` last,
    each atomically; the JSON marks the case done."""
    write_volume(result.labels, output / f"{case}{ending}")
    if result.probabilities is not None:
        values = sorted(result.probabilities)
        foreground = np.stack([result.probabilities[v] for v in values]) if values else np.zeros((0, *result.labels.shape), np.float32)
        background = np.clip(1.0 - foreground.sum(axis=0), 0.0, 1.0)
        stack = np.concatenate([background[None], foreground]).transpose(0, 3, 2, 1)  # nnU-Net's (C, Z, Y, X)
        with atomic_path(output / f"{case}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, probabilities=stack.astype(np.float16), labels=np.array([0, *values]))
    report = {"case": case, "input": [str(p) for p in inputs], **result.report}
    with atomic_path(output / f"{case}_boxes.json") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1))


def is_done(output: Path, case: str, ending: str) -> bool:
    return (output / f"{case}{ending}").is_file() and (output / f"{case}_boxes.json").is_file()


def predict_files(predictor: LocalizedPredictor, images: list[Path], output: Path, num_parts: int = 1, part_id: int = 0) -> dict:
    """Predict every case of this part (``images[part_id::num_parts]``, channel-0 files or DICOM folders) into
    ``output``; finished cases are skipped unless ``options.overwrite``. Returns counts of predicted/skipped cases."""
    if not 0 <= part_id < num_parts:
        raise InputError(f"--part-id {part_id}: must be in 0..{num_parts - 1} for --num-parts {num_parts}")
    names = [output_name(p) for p in images]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise InputError(f"several inputs are named '{duplicate}'; give the cases unique file names")
    files = [source_channel_files(p, predictor.source_channels) for p in images]  # checked before any output
    check_cases([(n, f, None) for n, f in zip(names, files)], MIN_VOXELS, finite=False)  # headers; NaN: skipped at read
    ending = predictor.models[0].file_ending
    output.mkdir(parents=True, exist_ok=True)
    busy = (f"predict -o {output}: another job is predicting part {part_id} of {num_parts} into this folder right now; "
            "wait for it to finish (other parts may run at the same time)")
    with locked(output / PREDICT_LOCK, part_id, busy=busy):
        remove_leftovers(output)  # staging files of killed runs (a rerun may have nothing left to write)
        _write_run_files(predictor, output, ending)
        mine = list(zip(names, files))[part_id::num_parts]
        todo = [(n, f) for n, f in mine if predictor.options.overwrite or not is_done(output, n, ending)]
        bar = tqdm(todo, desc="predict", unit="case", disable=not todo)
        skipped = Skipped()  # cases whose voxels cannot be used (NaN): left out, named at the end
        for case, case_files in bar:
            bar.set_postfix_str(f"{case}: read")
            began = time.perf_counter()
            channels = skipped.read(case, lambda: read_channels(case_files, min_size=MIN_VOXELS))
            if channels is None:
                continue
            result = predictor.predict_case(channels, stage=lambda s, c=case: bar.set_postfix_str(f"{c}: {s}"))
            result.report["seconds"]["case"] = round(time.perf_counter() - began, 3)  # read + localize + predict + paste
            bar.set_postfix_str(f"{case}: write")
            write_case(result, output, case, ending, case_files)
        bar.close()
        skipped.finish()
    return {"predicted": len(todo), "skipped": len(mine) - len(todo), "part_cases": len(mine), "all_cases": len(images)}


def _write_run_files(predictor: LocalizedPredictor, output: Path, ending: str) -> None:
    """``dataset.json`` (the output labels, so nnUNetv2_evaluate_folder can score the folder) and ``predict.json``
    (the models and options used)."""
    dataset = {"labels": predictor.output_labels, "file_ending": ending, "channel_names": {"0": "CT"},
               "numTraining": 0, "nnunet_ape": {"kind": "predictions"}}
    run = {"models": [{"model": m.name, "folder": str(m.folder), "kind": m.kind, "organs": m.organs} for m in predictor.models],
           "options": predictor.options.__dict__, "merge_rule": MERGE_RULE}
    for name, content in (("dataset.json", dataset), ("predict.json", run)):
        with atomic_path(output / name) as tmp:
            Path(tmp).write_text(json.dumps(content, indent=1))
