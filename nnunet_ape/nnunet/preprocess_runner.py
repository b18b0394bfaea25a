"""``nnunet-ape preprocess``: run :class:`~nnunet_ape.nnunet.preprocessor.nnUNetAPEPreprocessor` over a dataset's
training cases into ``$nnUNet_preprocessed/DatasetXXX/<data_identifier>``, as ``nnUNetv2_preprocess`` would.

nnU-Net finds preprocessors only inside its own package, so this command runs ours. It writes nnU-Net's own
files (``CASE.b2nd``, ``CASE_seg.b2nd``, ``CASE.pkl``; written in a hidden staging folder and moved in with the
``.b2nd``, by which nnU-Net lists cases, last, so a case nnU-Net lists is complete), skips
finished cases when restarted with the same settings, copies the full label maps to ``gt_segmentations`` (what
validation scores against) and, for crop configurations, has nnU-Net's planner plan the patch size for the crops'
median shape. A summary of the boxes goes to ``nnunet_ape/<data_identifier>.crops.json`` beside the data folder.
Configurations preprocessed together share, per case, one read of its files and one APE (and BPR) pass: their
organ groups' boxes all come from it, and each configuration's files are what a run of it alone writes.
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

from nnunet_ape.atomic import atomic_path, staged_files, sweep
from nnunet_ape.errors import InputError
from nnunet_ape.gpu_processes import GPU_BYTES_PER_PROCESS, free_gpu_memory, gpu_processes
from nnunet_ape.input_checks import check_cases
from nnunet_ape.nnunet.ape_plans import (SETTINGS_KEY, APESettings, plan_for_crops, read_plans, resolved_configuration,
                                          settings_of)
from nnunet_ape.nnunet.crop_dataset import describe
from nnunet_ape.nnunet.crop_dataset import summary as crop_summary
from nnunet_ape.threads import available_cores, threads_per_process

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


def _init_worker(jobs: list[PreprocessJob], threads: int) -> None:
    """Per process: one preprocessor (its models shared by the configurations) and each job's nnU-Net managers."""
    import torch

    from nnunet_ape.nnunet.preprocessor import nnUNetAPEPreprocessor

    torch.set_num_threads(threads)
    preprocessor = nnUNetAPEPreprocessor(verbose=False)
    preprocessor.device = jobs[0].device
    dataset_json = json.loads((jobs[0].raw / "dataset.json").read_text())
    _WORKER.update(jobs=jobs, managers=[_managers(job) for job in jobs], preprocessor=preprocessor, dataset_json=dataset_json)


def _run_case(case: str, images: list[str], label: str, which: list[int]) -> tuple[str, list[tuple[int, dict]]]:
    """Preprocess one case for the jobs numbered ``which`` (those without it yet), reading it once and with one
    APE/BPR pass for all; returns the case and each job's record."""
    w = _WORKER
    preprocessor = w["preprocessor"]
    settings = [settings_of(config.configuration) for _, config in (w["managers"][i] for i in which)]
    records = []
    with preprocessor.shared_case(settings):
        for i in which:
            output = w["jobs"][i].output
            plans, config = w["managers"][i]
            with staged_files(output, case, CASE_FILES) as prefix:  # written in a hidden folder: a kill leaves no half case
                preprocessor.run_case_save(prefix, images, label, plans, config, w["dataset_json"])
            records.append((i, _case_record(output, case)))
    return case, records


# nnU-Net lists a case by its .b2nd: moved in last, after the .pkl, so nnU-Net never lists a case it cannot read
CASE_FILES = ("_seg.b2nd", ".pkl", ".b2nd")


def _is_done(folder: Path, case: str) -> bool:
    """Whether ``folder`` holds all of ``case``'s files (a kill between the moves leaves it to redo)."""
    return all((folder / f"{case}{suffix}").is_file() for suffix in CASE_FILES)


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


def default_num_processes(device: str) -> int:
    """``-np``'s default: nnU-Net's default number of processes ($nnUNet_def_n_proc, else 8), but at most the cores
    this process may use and at most 4 (2 on a GPU): each process loads its own APE/BPR models and holds a whole CT
    with its maps (GBs for a 512x512x300 CT; on a GPU also its own CUDA context)."""
    from nnunetv2.configuration import default_num_processes as nnunet_default

    return max(1, min(nnunet_default, available_cores(), 2 if device.startswith("cuda") else 4))


def num_processes(device: str, requested: int | None = None) -> tuple[int, str | None]:
    """How many processes preprocess: ``requested`` (``-np``), else :func:`default_num_processes`; on a CUDA
    ``device`` at most as many as share the GPU (:func:`~nnunet_ape.gpu_processes.gpu_processes`: each holds its own
    CUDA context, models and a case's temporaries). Returns the number and, when it is fewer than ``requested``, a
    line saying why."""
    processes = requested or default_num_processes(device)
    if not device.startswith("cuda") or processes == 1:
        return processes, None
    free = free_gpu_memory(device)
    allowed = gpu_processes(processes, free)
    if requested is None or allowed >= requested:
        return allowed, None
    memory = "" if free is None else f" ({free / 2**30:.1f} GiB free, about {GPU_BYTES_PER_PROCESS / 2**30:.0f} GiB each)"
    return allowed, (f"-np {requested}: at most {allowed} processes run the models on {device}{memory}, each with its own "
                     f"CUDA context; running {allowed} (--device cpu runs more, slower)")


def preprocess_configuration(job: PreprocessJob) -> dict:
    """Preprocess one configuration: :func:`preprocess_configurations` of ``[job]``; returns its summary."""
    return preprocess_configurations([job])[0]


def preprocess_configurations(jobs: list[PreprocessJob]) -> list[dict]:
    """Preprocess every training case for all ``jobs`` (configurations of one dataset and plans) together: per case
    its files are read once and one APE (and BPR) pass serves every configuration (each gets what it would get
    alone). A case is skipped for the configurations that have it already (a killed run resumes). Then per
    configuration: crops are re-planned and the summary written. Returns the summaries, in the order of ``jobs``."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    first = jobs[0]
    configs = [_ape_configuration(job) for job in jobs]
    dataset_json = json.loads((first.raw / "dataset.json").read_text())
    cases = get_filenames_of_train_images_and_targets(str(first.raw), dataset_json)
    if not cases:
        raise InputError(f"{first.raw}: no training cases")
    check_cases([(c, [Path(p) for p in e["images"]], Path(e["label"])) for c, e in cases.items()])  # before any output
    for job, config in zip(jobs, configs):
        _check_marker(job, _data_settings(config))
    settings = [settings_of(config) for config in configs]
    _copy_ground_truth(first, cases, dataset_json["file_ending"])
    for job in jobs:
        sweep(job.output)  # what killed runs left in its staging folder
    done = [{c: _case_record(job.output, c) for c in cases if _is_done(job.output, c)} for job in jobs]
    todo = {c: [i for i in range(len(jobs)) if c not in done[i]] for c in cases}
    todo = {c: which for c, which in todo.items() if which}
    names = " ".join(job.configuration for job in jobs)
    bar = tqdm(total=len(cases), initial=len(cases) - len(todo), desc=f"preprocess {names}", unit="case")
    processes = max(1, min(first.num_processes, len(todo)))
    threads = threads_per_process(processes)
    if processes == 1:
        _init_worker(jobs, threads)
        results = (_run_case(c, cases[c]["images"], cases[c]["label"], which) for c, which in todo.items())
        _collect(results, done, bar)
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(processes, mp_context=context, initializer=_init_worker, initargs=(jobs, threads)) as pool:
            futures = [pool.submit(_run_case, c, cases[c]["images"], cases[c]["label"], which) for c, which in todo.items()]
            _collect((future.result() for future in as_completed(futures)), done, bar)
    bar.close()
    return [_finish(job, s, [done[i][c] for c in cases]) for i, (job, s) in enumerate(zip(jobs, settings))]


def _ape_configuration(job: PreprocessJob) -> dict:
    """A job's resolved plans configuration; InputError for a stock one."""
    config = resolved_configuration(read_plans(job.preprocessed, job.plans_identifier), job.configuration)
    if settings_of(config) is None:
        raise InputError(f"configuration '{job.configuration}' is a stock nnU-Net configuration; preprocess it with "
                         f"'nnUNetv2_preprocess -d {job.preprocessed.name} -c {job.configuration}'")
    return config


def _data_settings(config: dict) -> dict:
    """What a configuration's preprocessed data depend on (not what the crop re-plan changes)."""
    what = {k: v for k, v in config.items() if k not in ("patch_size", "batch_size", "architecture", "median_image_size_in_voxels")}
    what[SETTINGS_KEY] = {k: v for k, v in what[SETTINGS_KEY].items() if k != "crop_plan"}
    return what


def _collect(results, done: list[dict], bar: tqdm) -> None:
    """File each finished case's records (``(case, [(job index, record)])``) under their jobs."""
    for case, records in results:
        for i, record in records:
            done[i][case] = record
        bar.update()


def _finish(job: PreprocessJob, settings: APESettings, records: list[dict]) -> dict:
    """One configuration's summary of its cases' ``records``; crops re-planned for their median shape."""
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
