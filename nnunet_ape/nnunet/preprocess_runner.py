"""``nnunet-ape preprocess``: run :class:`~nnunet_ape.nnunet.preprocessor.nnUNetAPEPreprocessor` over a dataset's
training cases into ``$nnUNet_preprocessed/DatasetXXX/<data_identifier>``, as ``nnUNetv2_preprocess`` would.

nnU-Net finds preprocessors only inside its own package, so this command runs ours. It writes nnU-Net's own
files (``CASE.b2nd``, ``CASE_seg.b2nd``, ``CASE.pkl``; the ``.pkl`` last, so a case with one is complete), skips
finished cases when restarted with the same settings, copies the full label maps to ``gt_segmentations`` (what
validation scores against) and, for crop configurations, has nnU-Net's planner plan the patch size for the crops'
median shape. A summary of the boxes goes to ``nnunet_ape/<data_identifier>.crops.json`` beside the data folder.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_ape.atomic import atomic_path
from nnunet_ape.errors import InputError
from nnunet_ape.nnunet.ape_plans import SETTINGS_KEY, plan_for_crops, read_plans, resolved_configuration, settings_of
from nnunet_ape.nnunet.crop_dataset import describe
from nnunet_ape.nnunet.crop_dataset import summary as crop_summary
from nnunet_ape.threads import threads_per_process

STATE_FOLDER = "nnunet_ape"  # beside the data folders: nnU-Net infers the dataset class from the files inside them


@dataclass
class PreprocessJob:
    """One configuration to preprocess: where the plans and data are, and how to run."""

    preprocessed: Path
    raw: Path
    plans_identifier: str
    configuration: str
    num_processes: int = 1
    device: str = "cpu"

    @cached_property
    def data_identifier(self) -> str:
        return resolved_configuration(read_plans(self.preprocessed, self.plans_identifier), self.configuration)["data_identifier"]

    @property
    def output(self) -> Path:
        return self.preprocessed / self.data_identifier

    @property
    def marker(self) -> Path:
        """The settings the data folder was made with."""
        return self.preprocessed / STATE_FOLDER / f"{self.data_identifier}.settings.json"

    @property
    def summary(self) -> Path:
        """Per case the boxes used (source voxels) and how they came out."""
        return self.preprocessed / STATE_FOLDER / f"{self.data_identifier}.crops.json"


def _managers(job: PreprocessJob):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = PlansManager(str(job.preprocessed / f"{job.plans_identifier}.json"))
    return plans, plans.get_configuration(job.configuration)


_WORKER: dict = {}


def _init_worker(job: PreprocessJob, threads: int) -> None:
    import torch

    from nnunet_ape.nnunet.preprocessor import nnUNetAPEPreprocessor

    torch.set_num_threads(threads)
    preprocessor = nnUNetAPEPreprocessor(verbose=False)
    preprocessor.device = job.device
    plans, config = _managers(job)
    dataset_json = json.loads((job.raw / "dataset.json").read_text())
    _WORKER.update(output=job.output, preprocessor=preprocessor, plans=plans, config=config, dataset_json=dataset_json)


def _run_case(case: str, images: list[str], label: str) -> dict:
    w = _WORKER
    w["preprocessor"].run_case_save(str(w["output"] / case), images, label, w["plans"], w["config"], w["dataset_json"])
    return _case_record(w["output"], case)


def _case_record(folder: Path, case: str) -> dict:
    import blosc2
    from batchgenerators.utilities.file_and_folder_operations import load_pickle

    properties = load_pickle(str(folder / f"{case}.pkl"))
    shape = blosc2.open(urlpath=str(folder / f"{case}.b2nd"), mode="r").shape
    record = {"case": case, "split": "train", "preprocessed_shape": [int(s) for s in shape[1:]], **properties.get("nnunet_ape", {})}
    # the fields crop-dataset's summary reads
    box = np.asarray(record.get("box_voxels", [[0, 0, 0], properties["shape_before_cropping"]]))
    record["voxel_ratio"] = float(np.prod(properties["shape_before_cropping"]) / np.prod(box[1] - box[0]))
    record["grown"] = bool(np.max(record.get("grown_mm", 0)) > 0)
    return record


def _check_marker(job: PreprocessJob, settings: dict) -> None:
    """Start fresh when the folder holds data of other settings (the configuration was planned again)."""
    marker = job.marker
    if job.output.exists() and (not marker.is_file() or json.loads(marker.read_text()) != settings):
        print(f"{job.output}: holds data of other settings; preprocessing it again")
        shutil.rmtree(job.output)
    job.output.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        with atomic_path(marker) as tmp:
            Path(tmp).write_text(json.dumps(settings, indent=1))


def _copy_ground_truth(job: PreprocessJob, cases: dict, file_ending: str) -> None:
    gt = job.preprocessed / "gt_segmentations"
    gt.mkdir(exist_ok=True)
    for case, entry in cases.items():
        target = gt / f"{case}{file_ending}"
        if not target.is_file():
            with atomic_path(target) as tmp:
                shutil.copyfile(entry["label"], tmp)


def preprocess_configuration(job: PreprocessJob) -> dict:
    """Preprocess every training case of ``job`` (skipping finished ones), plan crops, write the summary; returns it."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    plans = read_plans(job.preprocessed, job.plans_identifier)
    config = resolved_configuration(plans, job.configuration)
    settings = settings_of(config)
    if settings is None:
        raise InputError(f"configuration '{job.configuration}' is a stock nnU-Net configuration; preprocess it with "
                         f"'nnUNetv2_preprocess -d {job.preprocessed.name} -c {job.configuration}'")
    dataset_json = json.loads((job.raw / "dataset.json").read_text())
    cases = get_filenames_of_train_images_and_targets(str(job.raw), dataset_json)
    if not cases:
        raise InputError(f"{job.raw}: no training cases")
    what = {k: v for k, v in config.items() if k not in ("patch_size", "batch_size", "architecture", "median_image_size_in_voxels")}
    what[SETTINGS_KEY] = {k: v for k, v in what[SETTINGS_KEY].items() if k != "crop_plan"}
    _check_marker(job, what)
    _copy_ground_truth(job, cases, dataset_json["file_ending"])
    done = {c: _case_record(job.output, c) for c in cases if (job.output / f"{c}.pkl").is_file()}
    todo = [c for c in cases if c not in done]
    bar = tqdm(total=len(cases), initial=len(done), desc=f"preprocess {job.configuration}", unit="case")
    processes = max(1, min(job.num_processes, len(todo)))
    threads = threads_per_process(processes)
    if processes == 1:
        _init_worker(job, threads)
        for case in todo:
            done[case] = _run_case(case, cases[case]["images"], cases[case]["label"])
            bar.update()
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(processes, mp_context=context, initializer=_init_worker, initargs=(job, threads)) as pool:
            futures = [pool.submit(_run_case, c, cases[c]["images"], cases[c]["label"]) for c in todo]
            for future in as_completed(futures):
                record = future.result()
                done[record["case"]] = record
                bar.update()
    bar.close()
    records = [done[c] for c in cases]
    shapes = [r["preprocessed_shape"] for r in records]
    summary = crop_summary(records)
    summary["median_preprocessed_shape"] = np.median(shapes, axis=0).tolist()
    if settings.organs:
        summary["plan"] = plan_for_crops(job.preprocessed, job.plans_identifier, job.configuration, shapes)
    with atomic_path(job.summary) as tmp:
        Path(tmp).write_text(json.dumps({**summary, "cases": records}, indent=1))
    return summary


def describe_run(configuration: str, summary: dict) -> str:
    """A few lines for the terminal: the crop dataset's box report plus what was planned."""
    lines = [describe({"dataset": configuration, "kind": "crops" if "plan" in summary else "channels", "summary": summary})]
    lines.append(f"median preprocessed shape {[round(s) for s in summary['median_preprocessed_shape']]}")
    if "plan" in summary:
        lines.append(f"planned for the crops: patch size {summary['plan']['patch_size']}, batch size {summary['plan']['batch_size']}")
    return "\n".join(lines)
