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
that model's box), background = 1 - their sum, clipped to [0, 1]. Probabilities are asked of nnU-Net only where
merging uses them (boxes of two models overlap) or ``--save_probabilities`` wants them; elsewhere nnU-Net's argmax
path gives the same labels without the ``(C, Z, Y, X)`` float32 softmax.

**Many cases** (:func:`predict_files`): the next case is read (on CUDA also localized) in a background thread while
one predicts, and finished cases are written in another, as ``nnUNetv2_predict`` overlaps its I/O; each file is
written atomically, ``CASE_boxes.json`` (the done mark) last.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
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
    background_io: bool = True  # read (and embed) the next case and write the last one while a case predicts
    embed_ahead: bool | None = None  # the next case's localize stage ahead too; None: on a CUDA device only


@dataclass
class CaseResult:
    """One case's output: ``labels`` on the CT's grid (``(X, Y, Z)``, output label values), the report for
    ``CASE_boxes.json``, and per output label its probability ``(X, Y, Z)`` float32 when asked for."""

    labels: Volume
    report: dict
    probabilities: dict[int, np.ndarray] | None = None


@dataclass
class PreparedCase:
    """What :meth:`LocalizedPredictor.prepare` gives for one CT: per model (in the order given) its
    :class:`~nnunet_ape.case_features.CaseFeatures` (None for a stock model), and the seconds it took (None when
    no model localizes)."""

    features: list
    localize_seconds: float | None


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

    def _order(self) -> list[int]:
        """Model indices in prediction order: channel models first (one APE pass per checkpoint for all models,
        :func:`case_features`' shared passes)."""
        return sorted(range(len(self.models)), key=lambda i: "ape" not in self.models[i].added_channels)

    def prepare(self, channels: list[Volume]) -> PreparedCase:
        """The localize stage of one CT: every model's boxes and embedding channels (one APE and one BPR pass per
        checkpoint for all models). It needs nothing of the nnU-Net models, so it can run for the next case while
        this one predicts (:func:`predict_files`)."""
        began = time.perf_counter()
        passes: dict = {}
        features: list = [None] * len(self.models)
        for i in self._order():
            if self.feature_models[i] is not None:
                features[i] = case_features(self.feature_models[i], channels[0], passes)
        localized = any(f is not None for f in self.feature_models)
        return PreparedCase(features, time.perf_counter() - began if localized else None)

    def predict_case(self, channels: list[Volume], stage=lambda name: None, prepared: PreparedCase | None = None) -> CaseResult:
        """Predict one CT (``channels``: its source channel Volumes on one grid, channel 0 the CT in HU) with every
        model, merged (module docstring). ``stage(name)`` is called as each stage begins (for progress bars);
        ``prepared``: what :meth:`prepare` gave for these channels (computed here when None).

        Each prediction takes nnU-Net's argmax path (no per-voxel probabilities) unless its box overlaps the box of
        another model of the case (then merging needs the probability of each voxel's label) or
        ``--save_probabilities`` asks for them; a model whose final box comes to overlap another's only through a
        later regrowth is predicted again on it with probabilities. Labels are the same either way."""
        ct = channels[0]
        seconds: dict[str, float] = {}
        if prepared is None:
            stage("localize")
            prepared = self.prepare(channels)
        if prepared.localize_seconds is not None:
            seconds["localize"] = prepared.localize_seconds
        order = self._order()
        keep = self.options.save_probabilities
        first = [self._first_box(model, prepared.features[i], ct) for i, model in enumerate(self.models)]
        entries: list[dict] = [entry for entry, _ in first]
        boxes: list[np.ndarray | None] = [box for _, box in first]
        results: list[RegionPrediction | None] = [None] * len(self.models)
        for i in order:
            model = self.models[i]
            if boxes[i] is None:
                entries[i]["seconds"] = 0.0
                continue
            stage(model.name.split("__")[-1])
            began = time.perf_counter()
            others = [j for j in range(len(self.models)) if j != i]
            added = prepared.features[i].channels if prepared.features[i] is not None else None
            results[i], boxes[i] = self._regrow(model, entries[i], channels, added, boxes[i],
                                                lambda box: keep or any(_overlap(box, boxes[j]) for j in others))
            entries[i]["seconds"] = round(time.perf_counter() - began, 3)
        for i in order:  # a later regrowth reached into a box predicted without probabilities: predict it again with them
            if results[i] is None or results[i].confidence is not None:
                continue
            if any(_overlap(boxes[i], boxes[j]) for j in range(len(self.models)) if j != i and results[j] is not None):
                model = self.models[i]
                stage(model.name.split("__")[-1])
                began = time.perf_counter()
                added = prepared.features[i].channels if prepared.features[i] is not None else None
                results[i] = predict_region(model, channels, added, boxes[i], keep, confidence=True)
                entries[i]["seconds"] = round(entries[i]["seconds"] + time.perf_counter() - began, 3)
                entries[i]["predicted_again_for_merge"] = True
        labels = np.zeros(ct.shape, dtype=np.uint16)
        confidence = np.zeros(ct.shape, dtype=np.float32) if any(r is not None and r.confidence is not None for r in results) else None
        probabilities: dict[int, np.ndarray] | None = {} if keep else None
        for i in order:
            result = results[i]
            if "seconds" in entries[i]:
                seconds[self.models[i].name] = entries[i]["seconds"]
            if result is None:
                continue
            cut = slices(boxes[i])
            if result.confidence is None:  # no other model's box overlaps this one: its labels stand as they are
                better = result.labels > 0
                labels[cut][better] = result.labels[better]
                continue
            better = (result.labels > 0) & (result.confidence > confidence[cut])
            labels[cut][better] = result.labels[better]
            confidence[cut][better] = result.confidence[better]
            if probabilities is not None:
                for value, p in result.probabilities.items():
                    full = probabilities.setdefault(value, np.zeros(ct.shape, dtype=np.float32))
                    np.maximum(full[cut], p, out=full[cut])
        dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
        report = {"models": entries, "merge_rule": MERGE_RULE if len(self.models) > 1 else "one model",
                  "image": geometry(ct),
                  "labels": self.output_labels, "seconds": {k: round(v, 3) for k, v in seconds.items()}}
        return CaseResult(ct.with_array(labels.astype(dtype)), report, probabilities)

    def _first_box(self, model: TrainedModel, features, ct: Volume) -> tuple[dict, np.ndarray | None]:
        """The model's report entry so far and the box it predicts on first (None: nothing to predict)."""
        entry: dict = {"model": model.name, "kind": model.kind, "organs": model.organs}
        box = np.array([[0, 0, 0], list(ct.shape)], dtype=np.int64)
        if not model.crops:
            return entry, box
        boxes = features.boxes
        keys = ("crop_box_voxels", "crop_box", "placed", "method", "ape_boxes", "alpha", "margin_mm", "bpr_z_range")
        entry["localizer"] = {o: {k: boxes[o][k] for k in keys if k in boxes[o]} for o in model.organs}
        placed = [o for o in model.organs if boxes[o]["placed"]]
        unplaced = [o for o in model.organs if not boxes[o]["placed"]]
        if unplaced:
            what = "predicted on the whole image instead" if self.options.fallback_full else \
                "left empty (--fallback-full predicts the whole image instead)"
            tqdm.write(f"warning: the localizer could not place {', '.join(unplaced)} on this CT; {what}", file=sys.stderr)
            entry["unplaced"] = unplaced
        if unplaced and self.options.fallback_full:
            entry["fallback"] = "whole image"
            return entry, box
        if not placed:
            entry["skipped"] = "no organ placed"
            return entry, None
        box = None
        for organ in placed:
            organ_box = crop_box(np.asarray(boxes[organ]["crop_box_voxels"]), ct.shape)
            box = organ_box if box is None else union_box(box, organ_box)
        return entry, box

    def _regrow(self, model: TrainedModel, entry: dict, channels: list[Volume], added, box: np.ndarray, confident):
        """Predict ``model`` on ``box``, growing it where the predicted organs touch its faces (module docstring);
        ``confident(box)``: whether a prediction on ``box`` needs probabilities. Returns the last prediction and its box."""
        ct = channels[0]
        attempts = []
        while True:
            result = predict_region(model, channels, added, box, self.options.save_probabilities, confidence=confident(box))
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
        return result, box


def _overlap(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Whether two crop boxes (``[[x0, y0, z0], [x1, y1, z1]]``, half-open) share a voxel."""
    if a is None or b is None:
        return False
    return bool(np.all(np.maximum(a[0], b[0]) < np.minimum(a[1], b[1])))


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
    """Whether ``case`` is finished in ``output``: its segmentation (``ending``) and its ``_boxes.json`` report,
    written last, are both there."""
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
        bar = tqdm(total=len(todo), desc="predict", unit="case", disable=not todo)
        skipped = Skipped()  # cases whose voxels cannot be used (NaN): left out, named at the end
        options = predictor.options
        embed_ahead = options.background_io and (options.embed_ahead if options.embed_ahead is not None
                                                 else str(predictor.device).startswith("cuda"))
        reader = CaseReader(todo, predictor if embed_ahead else None, ahead=1 if options.background_io else 0)
        writer = BackgroundWriter(pending=1) if options.background_io else None
        try:
            for case, case_files, read in reader:
                bar.set_postfix_str(f"{case}: read")
                channels = skipped.read(case, read.channels)
                if channels is None:
                    bar.update()
                    continue
                began = time.perf_counter()
                result = predictor.predict_case(channels, stage=lambda s, c=case: bar.set_postfix_str(f"{c}: {s}"),
                                                prepared=read.prepared())
                # read + localize + predict + paste (the write comes after, in the background with background_io)
                result.report["seconds"]["read"] = round(read.seconds, 3)
                result.report["seconds"]["case"] = round(read.seconds + read.prepare_seconds + time.perf_counter() - began, 3)
                bar.set_postfix_str(f"{case}: write")
                if writer is None:
                    write_case(result, output, case, ending, case_files)
                else:
                    writer.put(write_case, result, output, case, ending, case_files)
                del result, channels
                bar.update()
        except BaseException:
            reader.close()
            if writer is not None:
                writer.close(raise_error=False)  # the cases finished before the error are still written
            raise
        reader.close()
        if writer is not None:
            writer.close()  # the finished cases are written before the lock goes; a write error is raised here
        bar.close()
        skipped.finish()
    return {"predicted": len(todo), "skipped": len(mine) - len(todo), "part_cases": len(mine), "all_cases": len(images)}


class _ReadCase:
    """One case as the reader gives it: its channels (or the InputError reading them raised), and what
    :meth:`LocalizedPredictor.prepare` gave when it ran ahead (its error raised when asked for)."""

    def __init__(self) -> None:
        self._channels = self._prepared = self._error = self._prepare_error = None
        self.seconds = self.prepare_seconds = 0.0

    def channels(self) -> list[Volume]:
        if self._error is not None:
            raise self._error
        return self._channels

    def prepared(self) -> PreparedCase | None:
        if self._prepare_error is not None:
            raise self._prepare_error
        return self._prepared


class CaseReader:
    """Iterate ``(case, files, _ReadCase)`` over ``todo``, reading each case's channels (and with ``predictor``
    its localize stage, :meth:`LocalizedPredictor.prepare`) in a background thread up to ``ahead`` cases beyond
    the one handed out, as nnU-Net's predictor preprocesses in background workers. ``ahead`` 0: everything in the
    caller's thread, in turn. Errors reach the caller with the case they belong to."""

    def __init__(self, todo: list, predictor: LocalizedPredictor | None = None, ahead: int = 1) -> None:
        self.todo, self.predictor, self.ahead = todo, predictor, ahead
        self._stop = threading.Event()
        self._thread = None

    def _read(self, case_files: list[Path]) -> _ReadCase:
        item = _ReadCase()
        began = time.perf_counter()
        try:
            item._channels = read_channels(case_files, min_size=MIN_VOXELS)
        except InputError as error:  # the caller skips the case (input_checks.Skipped)
            item._error = error
            return item
        finally:
            item.seconds = time.perf_counter() - began
        if self.predictor is not None:
            began = time.perf_counter()
            try:
                item._prepared = self.predictor.prepare(item._channels)
            except BaseException as error:  # raised in the caller's thread, at this case
                item._prepare_error = error
            item.prepare_seconds = time.perf_counter() - began
        return item

    def __iter__(self):
        if self.ahead <= 0:
            for case, case_files in self.todo:
                yield case, case_files, self._read(case_files)
            return
        items: queue.Queue = queue.Queue()
        slots = threading.Semaphore(self.ahead + 1)  # the case handed out + ``ahead`` read beyond it

        def produce() -> None:
            for case, case_files in self.todo:
                while not slots.acquire(timeout=0.1):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
                try:
                    items.put((case, case_files, self._read(case_files)))
                except BaseException as error:  # noqa: BLE001 - handed to the caller
                    items.put(error)
                    return

        self._thread = threading.Thread(target=produce, name="nnunet-ape-reader", daemon=True)
        self._thread.start()
        for _ in self.todo:
            item = items.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            slots.release()  # the caller is done with this case: read one more

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class BackgroundWriter:
    """Run writes (``put(function, *args)``) in one background thread, in order, at most ``pending`` waiting
    beyond the one being written (the caller waits for room: memory stays bounded). The first error stops the
    writer and is raised in the caller at its next ``put`` or at ``close``, which waits for every write."""

    def __init__(self, pending: int = 1) -> None:
        self._jobs: queue.Queue = queue.Queue(maxsize=max(1, pending))
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="nnunet-ape-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self.error is None:
                try:
                    job[0](*job[1:])
                except BaseException as error:  # noqa: BLE001 - raised in the caller
                    self.error = error

    def put(self, function, *args) -> None:
        if self.error is not None:
            raise self.error
        self._jobs.put((function, *args))

    def close(self, raise_error: bool = True) -> None:
        self._jobs.put(None)
        self._thread.join()
        if raise_error and self.error is not None:
            raise self.error


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
