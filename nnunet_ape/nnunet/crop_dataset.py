"""Write a new nnU-Net raw dataset from a source one: each case cropped to its organ box (``crop-dataset``) or
kept whole (``channels-dataset``), optionally with APE/BPR channels, plus a manifest (``crops.json``) that
``uncrop`` uses to paste predictions back.

The dataset is built under ``$nnUNet_raw/.DatasetXXX_Name.partial`` (hidden from nnU-Net, whose dataset lookup
matches ``DatasetXXX_*`` only) and renamed when every case is written, so nnU-Net never sees half a dataset. The
job's state lives beside it in ``.DatasetXXX_Name.state`` (its settings, and a small JSON entry per finished case),
never inside the dataset; a restarted run skips the finished cases, and a run started again after the dataset was
renamed into place finds it complete. One job per part of a dataset id at a time (a lock, :mod:`nnunet_ape.locks`);
the last part to finish assembles the dataset.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_ape.atomic import atomic_path, sweep
from nnunet_ape.case_features import FeatureModels, added_channel_names, case_features, load_feature_models
from nnunet_ape.checkpoint import file_hash
from nnunet_ape.crop_geometry import box_corners_mm, box_shape, crop, fraction_inside, grow_to_contain
from nnunet_ape.errors import InputError
from nnunet_ape.io import Volume, geometry, read_channels, write_volume
from nnunet_ape.cases import read_label, remap_labels
from nnunet_ape.nnunet.raw_dataset import (RawCase, RawDataset, assembling_dataset, check_id_free, dataset_json_for,
                                           writing_dataset)
from nnunet_ape.threads import threads_per_process

MANIFEST = "crops.json"
MANIFEST_FORMAT = "nnunet-ape/crops-v1"
MIN_VOXELS = 8
DEFAULT_MARGIN_MM = 10.0


@dataclass
class CropJob:
    """What to write. ``organs``: the chosen organs in target label order (empty for a channels dataset, which
    keeps every label); ``keep_labels``: keep all source labels inside the crop instead of renumbering the organs
    1..K; ``margin_mm``: how far a training box reaches beyond its label; ``models_args``: the arguments of
    :func:`nnunet_ape.case_features.load_feature_models` (each worker process loads the models itself)."""

    source: RawDataset
    target: Path
    organs: list[str]
    keep_labels: bool
    margin_mm: float
    models_args: dict
    num_processes: int = 1
    settings: dict = field(default_factory=dict)
    num_parts: int = 1
    part_id: int = 0

    @property
    def partial(self) -> Path:
        """The dataset while it is written (hidden from nnU-Net)."""
        return self.target.parent / f".{self.target.name}.partial"

    @property
    def state(self) -> Path:
        """The job's settings (``job.json``) and finished cases (``cases/CASE.json``), beside the partial dataset."""
        return self.target.parent / f".{self.target.name}.state"

    @property
    def localizer_path(self) -> Path | None:
        return self.models_args["localizer_path"]

    @property
    def cropped(self) -> bool:
        return self.localizer_path is not None


def target_labels(job: CropJob) -> tuple[dict[str, int], dict[int, int]]:
    """The target's ``labels`` (name -> value, background 0) and the map target value -> source value."""
    source = job.source.labels
    if job.keep_labels or not job.organs:
        return dict(source), {v: v for v in source.values()}
    labels = {"background": 0}
    labels.update({organ: i + 1 for i, organ in enumerate(job.organs)})
    return labels, {i + 1: source[organ] for i, organ in enumerate(job.organs)}


def process_case(case: RawCase, split: str, job: CropJob, models: FeatureModels) -> dict:
    """Crop (or keep whole) one case with its channels, write its files into the partial dataset, and return its
    manifest entry (also written, last, as the case's completion mark)."""
    channels = read_channels(case.images, min_size=MIN_VOXELS)
    ct = channels[0]
    label = read_label(case.label, ct, case.images[0]) if case.label is not None else None
    uncontoured = [o for o in job.organs if not (label == job.source.labels[o]).any()] if label is not None else []
    if split == "train" and uncontoured:
        # an uncontoured organ is label 0 although it is in the image: as training data it would teach background
        entry = {"case": case.case_id, "split": split, "skipped": "does not contour " + ", ".join(uncontoured)}
        with atomic_path(job.state / "cases" / f"{case.case_id}.json") as tmp:
            Path(tmp).write_text(json.dumps(entry))
        return entry
    features = case_features(models, ct)
    predicted = features.crop_box if features.crop_box is not None else np.array([[0, 0, 0], list(ct.shape)])
    box = predicted
    entry: dict = {"case": case.case_id, "split": split, "source_images": [str(p) for p in case.images],
                   "source": geometry(ct), "predicted_box_voxels": predicted.tolist()}
    if label is not None:
        entry["source_label"] = str(case.label)
        if job.cropped:
            values = [job.source.labels[o] for o in job.organs]
            entry["organ_fraction_in_predicted_box"] = {o: fraction_inside(label == v, predicted) for o, v in zip(job.organs, values)}
            box, grown_mm = grow_to_contain(predicted, np.isin(label, values), job.margin_mm, ct.spacing)
            entry["grown_mm"] = grown_mm.round(2).tolist()
            entry["grown"] = bool(grown_mm.max() > 0)
    entry.update({"box_voxels": box.tolist(), "box": box_corners_mm(ct, box), "crop_shape": list(box_shape(box)),
                  "voxel_ratio": float(np.prod(ct.shape) / np.prod(box_shape(box)))})
    if features.boxes:
        entry["localizer_boxes"] = {o: {k: b[k] for k in ("crop_box_voxels", "method", "ape_boxes") if k in b} for o, b in features.boxes.items()}
    images = job.partial / ("imagesTr" if split == "train" else "imagesTs")
    ending = job.source.file_ending
    for k, volume in enumerate(channels):
        write_volume(crop(volume, box) if job.cropped else volume, images / f"{case.case_id}_{k:04d}{ending}")
    if features.channels is not None:
        for j in range(features.channels.shape[3]):
            channel = ct.with_array(features.channels[..., j])
            write_volume(crop(channel, box) if job.cropped else channel, images / f"{case.case_id}_{len(channels) + j:04d}{ending}")
    if label is not None:
        if not (job.keep_labels or not job.organs):  # the chosen organs, renumbered 1..K
            label = remap_labels(label, {source: target for target, source in target_labels(job)[1].items()})
        relabeled = ct.with_array(label)
        write_volume(crop(relabeled, box) if job.cropped else relabeled, job.partial / "labelsTr" / f"{case.case_id}{ending}")
    with atomic_path(job.state / "cases" / f"{case.case_id}.json") as tmp:  # last: the case's done mark
        Path(tmp).write_text(json.dumps(entry))
    return entry


_WORKER: dict = {}


def _init_worker(job: CropJob, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _WORKER["job"] = job
    _WORKER["models"] = load_feature_models(**job.models_args)


def _run_in_worker(case: RawCase, split: str) -> dict:
    return process_case(case, split, _WORKER["job"], _WORKER["models"])


def _start_or_resume(job: CropJob) -> dict[str, dict]:
    """Create the partial folder and the job's state (or check that leftover ones were made with the same
    settings); returns the entries of the cases already finished."""
    marker = job.state / "job.json"
    old = job.partial / ".nnunet_ape"  # where versions before 2026-12-06 kept the state
    if old.is_dir() and not job.state.exists():
        os.replace(old, job.state)
    shutil.rmtree(job.state / "finishing", ignore_errors=True)  # their assembly mark (a lock now)
    if job.partial.exists() or job.state.exists():
        if not marker.is_file() or json.loads(marker.read_text()) != job.settings:
            raise InputError(f"{job.partial}: left by an earlier run with other settings; rerun with those settings to resume, "
                             f"or remove it and {job.state.name}")
    else:
        prefix = job.target.name.split("_")[0]
        others = sorted(job.target.parent.glob(f".{prefix}_*.partial")) + sorted(job.target.parent.glob(f".{prefix}_*.state"))
        if others:
            raise InputError(f"{others[0]}: an unfinished run for this dataset id under another name; resume it with that --name or remove it")
        with atomic_path(marker) as tmp:
            Path(tmp).write_text(json.dumps(job.settings, indent=1))
    job.partial.mkdir(exist_ok=True)
    return _finished_cases(job)


def completed(job: CropJob) -> dict | None:
    """The manifest of ``job.target`` when an earlier run with the same settings wrote it completely (it is renamed
    into place only when complete), after removing that run's leftover state; None when there is no such folder.
    InputError when the folder holds another dataset."""
    manifest = job.target / MANIFEST
    if not job.target.is_dir():
        return None
    content = json.loads(manifest.read_text()) if manifest.is_file() else {}
    if content.get("format") == MANIFEST_FORMAT:
        removed = sweep(job.target)  # .tmp_* files that versions before 2026-12-05 could leave in a finished dataset
        if removed:
            print(f"{job.target.name}: removed {len(removed)} temporary file(s) a killed earlier version left ({removed[0].name})")
    if content.get("settings") != job.settings:
        raise InputError(f"dataset id {job.target.name[7:10]} already exists ({job.target}), written with other settings "
                         "or by an earlier version; choose another -o id or remove that folder")
    shutil.rmtree(job.state, ignore_errors=True)  # left when a run was killed right after the rename
    return content


def run_job(job: CropJob, models: FeatureModels | None = None) -> dict | None:
    """Write this part's cases of the target dataset (every ``num_parts``-th case from ``part_id``; skipping cases
    a killed run finished); when no case of any part is left, rename the dataset into place and return the manifest,
    else return None (another part finishes it). ``models``: already loaded from ``job.models_args``. InputError
    when another job writes this part right now, or the dataset id is taken by another dataset."""
    with writing_dataset(job.target, "crop-dataset" if job.cropped else "channels-dataset", job.part_id, job.num_parts):
        finished = completed(job)
        if finished is not None:
            print(f"{job.target.name}: already complete (written by an earlier run with these settings)")
            return finished
        check_id_free(int(job.target.name[7:10]))
        done = _start_or_resume(job)
        every = [(c, "train") for c in job.source.training] + [(c, "test") for c in job.source.test]
        mine = every[job.part_id::job.num_parts]
        todo = [(c, s) for c, s in mine if c.case_id not in done]
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="crop-dataset" if job.cropped else "channels-dataset", unit="case")
        if job.num_processes <= 1 or len(todo) <= 1:
            models = models or load_feature_models(**job.models_args)
            for case, split in todo:
                done[case.case_id] = process_case(case, split, job, models)
                bar.update()
        else:
            threads = threads_per_process(job.num_processes)
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(job.num_processes, mp_context=context, initializer=_init_worker, initargs=(job, threads)) as pool:
                futures = [pool.submit(_run_in_worker, case, split) for case, split in todo]
                for future in as_completed(futures):
                    entry = future.result()
                    done[entry["case"]] = entry
                    bar.update()
        bar.close()
        with assembling_dataset(job.target):  # one part at a time, the others wait
            if job.target.is_dir():  # another part assembled it meanwhile
                return completed(job)
            done.update(_finished_cases(job))  # other parts' cases
            if any(c.case_id not in done for c, _ in every):
                return None
            return _finish(job, done)


def _finished_cases(job: CropJob) -> dict[str, dict]:
    done = {}
    for path in (job.state / "cases").glob("*.json"):
        entry = json.loads(path.read_text())
        done[entry["case"]] = entry
    return done


def _finish(job: CropJob, done: dict[str, dict]) -> dict:
    order = [c.case_id for c in job.source.training] + [c.case_id for c in job.source.test]
    skipped = [done[c] for c in order if "skipped" in done[c]]
    cases = [done[c] for c in order if "skipped" not in done[c]]
    if not any(c["split"] == "train" for c in cases):
        shutil.rmtree(job.partial)
        shutil.rmtree(job.state)
        raise InputError(f"no training case of {job.source.folder.name} contours {', '.join(job.organs)}: nothing to train on; "
                         "choose organs the labels contour")
    labels, to_source = target_labels(job)
    source_channels = list(job.source.dataset_json["channel_names"].values())
    models = job.models_args
    added = added_channel_names(models["channels"])
    manifest = {
        "format": MANIFEST_FORMAT,
        "kind": "crops" if job.cropped else "channels",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_dataset": str(job.source.folder.resolve()),
        "dataset": job.target.name,
        "file_ending": job.source.file_ending,
        "organs": job.organs,
        "labels": labels,
        "target_to_source_label": {str(k): v for k, v in to_source.items()},
        "channels": source_channels + added,  # names; dataset.json's channel_names hold nnU-Net's normalization
        "margin_mm": job.margin_mm,
        "summary": {**summary(cases), "skipped_training_cases": len(skipped)},
        **job.settings.get("models", {}),
        "cases": cases,
        "skipped_cases": skipped,
        "settings": job.settings,  # what a rerun compares to know the dataset complete
    }
    sweep(job.partial)  # staging files of killed writers never reach the dataset
    with atomic_path(job.partial / MANIFEST) as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=1))
    extra = {"kind": manifest["kind"], "manifest": MANIFEST, "dataset": job.target.name,
             "source_dataset": manifest["source_dataset"], "channels": manifest["channels"], "organs": job.organs}
    dataset_json = dataset_json_for(job.source.dataset_json, source_channels + ["noNorm"] * len(added), labels,
                                    sum(c["split"] == "train" for c in cases), extra)
    with atomic_path(job.partial / "dataset.json") as tmp:
        Path(tmp).write_text(json.dumps(dataset_json, indent=1))
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (job.partial / sub).mkdir(exist_ok=True)
    os.replace(job.partial, job.target)
    shutil.rmtree(job.state)
    return manifest


def summary(cases: list[dict]) -> dict:
    """How the boxes came out: training boxes that had to grow to hold their labels (count and mm), voxel ratio, and
    per organ the training cases whose labels do not contour it (``uncontoured``: case ids)."""
    train = [c for c in cases if c["split"] == "train" and "grown_mm" in c]
    grown = [float(np.max(c["grown_mm"])) for c in train if c["grown"]]
    ratios = [c["voxel_ratio"] for c in cases]
    fractions: dict[str, list[float]] = {}
    uncontoured: dict[str, list[str]] = {}
    for c in train:
        for organ, f in c["organ_fraction_in_predicted_box"].items():
            if f is not None:
                fractions.setdefault(organ, []).append(f)
            else:
                uncontoured.setdefault(organ, []).append(c["case"])
    return {
        "training_cases": len([c for c in cases if c["split"] == "train"]),
        "test_cases": len([c for c in cases if c["split"] == "test"]),
        "training_boxes_grown": len(grown),
        "largest_growth_mm": {"median": float(np.median(grown)) if grown else 0.0, "max": max(grown, default=0.0)},
        "organ_fraction_in_predicted_box": {o: {"mean": float(np.mean(f)), "min": float(np.min(f)), "cases": len(f)} for o, f in fractions.items()},
        "voxel_ratio": {"median": float(np.median(ratios)), "min": float(np.min(ratios)), "max": float(np.max(ratios))} if ratios else {},
        "uncontoured": uncontoured,
    }


def model_provenance(models: FeatureModels, localizer_path: Path | None) -> dict:
    """Paths and SHA-256 of the localizer and checkpoints used (for the manifest and the resume check)."""
    out: dict = {}
    for key, path in (("localizer", localizer_path), ("ape_checkpoint", models.ape_path), ("bpr_checkpoint", models.bpr_path)):
        if path is not None:
            out[key] = str(Path(path).resolve())
            out[key.replace("_checkpoint", "") + "_sha256"] = file_hash(path)
    return out


def describe(manifest: dict) -> str:
    """One paragraph for the terminal: where the dataset went and how its boxes came out."""
    s = manifest["summary"]
    lines = [f"{manifest['dataset']}: {s['training_cases']} training + {s['test_cases']} test case(s)"]
    if s.get("skipped_training_cases"):
        lines.append(f"{s['skipped_training_cases']} training case(s) left out: their labels do not contour every organ "
                     "(an uncontoured organ is background there; see skipped_cases in the manifest)")
    if manifest["kind"] == "crops":
        lines.append(f"training boxes grown to hold their labels: {s['training_boxes_grown']} of {s['training_cases']}"
                     + (f" (largest growth median {s['largest_growth_mm']['median']:.1f} mm, max {s['largest_growth_mm']['max']:.1f} mm)"
                        if s["training_boxes_grown"] else ""))
        for organ, f in s["organ_fraction_in_predicted_box"].items():
            lines.append(f"  {organ}: {f['mean']:.3f} of the organ inside the localizer's box on average (min {f['min']:.3f}, {f['cases']} cases)")
        for organ, missing in s.get("uncontoured", {}).items():
            lines.append(f"warning: {organ} is not contoured in {len(missing)} of {s['training_cases']} training case(s) "
                         f"(e.g. {missing[0]}): nnU-Net learns it as background there; contour it, or use "
                         "'nnunet-ape crop-dataset', which leaves such cases out")
        if s["voxel_ratio"]:
            lines.append(f"voxels: source / crop median {s['voxel_ratio']['median']:.1f}x (min {s['voxel_ratio']['min']:.1f}x, max {s['voxel_ratio']['max']:.1f}x)")
    return "\n".join(lines)

