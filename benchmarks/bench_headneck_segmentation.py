"""Benchmark (issue 28): localized nnU-Net against full-image nnU-Net on the head-and-neck cohort (real CT).

One benchmark, one machine, one split. Resumable: run the same command again and it continues where it stopped
(dataset, planning and preprocessing are kept; training continues from nnU-Net's ``checkpoint_latest.pth`` with
``--c``; prediction skips finished cases); ``--minutes`` bounds one invocation.

Split (``headneck_split``, shared by the cohort's benchmarks): of ../shared/data/Dataset901_HeadNeckCT (203 CTs on
128^3 grids, 7 organs), hn_169..hn_214 (40 cases) are the test set, used only for the final table; the other 163
cases train every model. The benchmark builds its own raw
dataset ``Dataset902_HeadNeckSplit`` under ``--work`` from symlinks (imagesTr/labelsTr: the 163 training cases,
imagesTs/labelsTs: the 40 test cases; nothing is copied) and sets nnUNet_raw, nnUNet_preprocessed and nnUNet_results
to folders inside ``--work`` for every nnU-Net command it runs.

Stages (models; issue 28's list):
  full      stock ``3d_fullres``, all 7 organs in one model (stock nnUNetTrainer): the baseline.
  coarse    stock ``3d_fullres`` planned by nnU-Net at 1.6x the spacing (``-overwrite_target_spacing``, plans
            ``nnUNetPlans_coarse``), predicted without TTA: the FLARE22 efficiency winner's speed alternative.
  crop      ``nnunet-ape plan --union`` + nnUNetTrainerAPECrop, one model per organ group (jaw: parotids +
            mandible; cns: brainstem + spinal cord; neck: larynx + esophagus; why: ``headneck_seg_crops``),
            predicted with ``nnunet-ape predict`` (regrowth on). The localizer: ``--localizer`` (fitted on the
            training cases), or fitted here from ``--ape-model`` (all-voxels, every training case a shot).
  channels  ``nnunet-ape plan --channels ape bpr`` + nnUNetTrainerAPEChannels: whole images + the 3 APE and the 1 BPR
            input channels (``--ape-model``, and ``--bpr-model`` or a tiny BPR pretrained here on the training CTs:
            ``nnunet-ape pretrain bpr --trunk tiny``, :data:`BPR_ITERATIONS` iterations, cosine schedule), trained
            like full, predicted with ``nnunet-ape predict`` (which embeds each test CT; TTA on).
  oracle    the crop models on the ground-truth box of each organ enlarged as the crop stage's localizer enlarges
            its own boxes, the union over the group (a perfect localizer).
  crop_tight the crop models, predicted with ``nnunet-ape predict -l`` and another localizer (``--tight-localizer``,
            e.g. one fitted with face margins): how much smaller crops save at prediction without retraining.

Planning: nnU-Net's own planner (``nnUNetv2_plan_and_preprocess -c 3d_fullres``, default ExperimentPlanner) makes
``nnUNetPlans``. ``--architecture reduced`` (the CPU default) trains every model with the same reduction, written as
the plans ``nnUNetPlansCPU`` (same preprocessed data): the planner's spacing, normalization, batch size and the
kernel sizes and strides of its first (at most) 4 stages, with bench_predict's SMALL U-Net widths (16, 32, 64, 128
features, 2 convolutions per stage and per decoder stage) and each axis of the planned patch capped at 64 voxels
(rounded down to a multiple of the network's total stride on that axis). Models whose planned patch is smaller
(crops) keep it. ``--architecture planned`` trains nnU-Net's planned network (``nnUNetPlans``; for a GPU).

Training (every model): nnU-Net's trainer with the benchmarks' mixin (``resumable_training``; nnU-Net finds it through a
generated module in ``WORK/ext``, ``nnUNet_extTrainer``): ``--epochs`` epochs of ``--iterations-per-epoch``
iterations (nnU-Net's poly learning rate runs over the whole --epochs, so these are fixed at the first start of a
stage and a later invocation must not change them), ``--val-iterations`` of nnU-Net's own validation batches per
epoch (its pseudo Dice and checkpoint_best), ``checkpoint_latest.pth`` after every epoch. With ``--minutes`` the
trainer stops cleanly at the end of the epoch after which one more epoch (as long as the last one) would exceed
the budget, and a model is not started or continued when an epoch as long as the stage's longest logged so far
would (``epoch_fits``); nnU-Net's final full validation is skipped (the learning curve and the test table replace it). Fold 0
of nnU-Net's own 5-fold split of the 163 training cases (seed 12345, written as splits_final.json): 130 train,
33 validate.

Labels: the cohort labels an organ a case does not contour as 0. Stock nnU-Net (stage full) trains on every
training case as it is, so it learns those organs as background there (of the 163 training cases 63 contour the
esophagus, 82 the larynx, 109 the mandible, 145-161 the others; 29 contour all 7): the baseline users get.

Learning curve: every ``--curve-every`` epochs (and after the last) the trainer predicts ``--curve-cases`` fixed
fold-0 validation cases (those contouring the most organs, then by name) with nnU-Net's own validation path
(``perform_actual_validation``, no mirroring; crop trainers predict on their localizer boxes and paste back) and
scores Dice per organ in the source geometry against the source labels (an organ a case does not contour is
skipped for that case). Each epoch appends one JSON line to ``WORK/<stage>/training_log.jsonl``: epoch,
iterations, seconds of the epoch (training + nnU-Net's validation batches; the curve's own seconds apart),
cumulative training seconds over all invocations, losses, nnU-Net's pseudo Dice, peak memory and the curve point.
The 40 test cases are never used before the final evaluation.

Final evaluation (a stage whose training finished): the 40 test cases predicted by stock nnU-Net
(``nnUNetPredictor``, what ``nnUNetv2_predict`` runs, here sequentially in one process of its own, so that seconds
per case split into preprocessing, network and export, and peak memory is the prediction's own; TTA as nnU-Net
does unless the stage says otherwise), then per organ Dice and NSD (normalized surface Dice at ``--nsd-mm``, surface
voxels and Euclidean distance transforms with the voxel spacing) in the source geometry; uncontoured organs are
skipped per case. Writes ``WORK/<stage>/test_scores.json``, ``WORK/report.md`` (tables, marked partial where a
stage is unfinished) and ``WORK/dice_vs_training_time.png``.

    python benchmarks/bench_headneck_segmentation.py run --stages full --minutes 120          # start, and resume
    python benchmarks/bench_headneck_segmentation.py run --stages crop oracle --ape-model runs/ape_hn/checkpoint_final.pt
    python benchmarks/bench_headneck_segmentation.py run --stages channels --ape-model runs/ape_hn/checkpoint_final.pt
    python benchmarks/bench_headneck_segmentation.py run --prepare-only                        # plan + preprocess
    python benchmarks/bench_headneck_segmentation.py report                                   # tables + PNG only
    python benchmarks/bench_headneck_segmentation.py run --architecture planned --device cuda --work /data/hn_gpu
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
from bench_embed import machine  # noqa: E402
from bench_predict import SMALL  # noqa: E402
from bench_trainers import _run  # noqa: E402
from headneck_seg_crops import GROUPS, cap_batch, group_configuration  # noqa: E402
from headneck_split import HEADNECK, TEST_NUMBERS, is_test_case  # noqa: E402
from resumable_training import ResumableTraining, epoch_fits, read_log  # noqa: E402

from nnunet_ape.segmentation_scores import score_case  # noqa: E402

DATASET_ID = 902
DATASET = f"Dataset{DATASET_ID}_HeadNeckSplit"
PLANS = {"reduced": "nnUNetPlansCPU", "planned": "nnUNetPlans"}
PATCH_CAP = 64
TRAINER = "nnUNetTrainerHeadNeckBench"
STAGES = {
    "full": "stock 3d_fullres, all 7 organs in one model (implemented)",
    "coarse": "stock 3d_fullres planned at 1.6x the spacing, predicted without TTA (implemented)",
    "crop": "nnunet-ape plan + nnUNetTrainerAPECrop per organ group (jaw, cns, neck), nnunet-ape predict (implemented)",
    "channels": "nnUNetTrainerAPEChannels, whole images + APE and BPR channels (implemented)",
    "oracle": "the crop models on the ground-truth boxes enlarged as the localizer enlarges its own (implemented; needs crop)",
    "crop_tight": "the crop models localized by --tight-localizer (nnunet-ape predict -l; implemented; needs crop)",
}
TEST_CASES_N = 40  # hn_169..hn_214 (headneck_split)
CROP_TRAINER = "nnUNetTrainerHeadNeckBenchCrop"
CHANNELS_TRAINER = "nnUNetTrainerHeadNeckBenchChannels"
BPR_ITERATIONS = 12000  # the tiny trunk ran 14,856 iterations in 8 CPU minutes on this cohort (docs/benchmarks.md)
# How each implemented stage is trained and predicted (the later stages add their entries).
IMPLEMENTED = {"full": {"configuration": "3d_fullres", "trainer": TRAINER, "tta": True},
               "coarse": {"configuration": "3d_fullres", "plans": "nnUNetPlans_coarse", "trainer": TRAINER, "tta": False},
               "crop": {"groups": list(GROUPS), "trainer": CROP_TRAINER, "tta": True},
               "channels": {"configuration": "3d_fullres_ape_bpr", "trainer": CHANNELS_TRAINER, "tta": True},
               "oracle": {"models_of": "crop", "trainer": CROP_TRAINER, "tta": True},
               "crop_tight": {"models_of": "crop", "trainer": CROP_TRAINER, "tta": True}}
LOCALIZED = ("crop", "oracle", "crop_tight")  # stages whose test table reports each organ's share inside its box
WHOLE_IMAGE = ("full", "coarse", "channels")  # stages of one model of every organ on the whole image
DEFAULTS = {"epochs": 50, "iterations_per_epoch": 100, "val_iterations": 10, "curve_every": 2, "curve_cases": 8}


# ----------------------------------------------------------------------------------------------------------- data

def split_cases(source: Path = HEADNECK) -> tuple[list[str], list[str]]:
    """The source dataset's case names (``hn_XXX``) as (training, test), each sorted: the split every benchmark on
    the cohort shares (``headneck_split``: test = hn_169..hn_214)."""
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (source / "imagesTr").glob("*_0000.nii.gz"))
    return [c for c in cases if not is_test_case(c)], [c for c in cases if is_test_case(c)]


def organ_labels(source: Path = HEADNECK) -> dict[str, int]:
    """Organ name -> label value of the source dataset (background left out)."""
    labels = json.loads((source / "dataset.json").read_text())["labels"]
    return {name: int(value) for name, value in labels.items() if name != "background"}


def _link(target: Path, link: Path) -> None:
    """Symlink ``link`` -> ``target`` unless it already points there."""
    if link.is_symlink() and link.resolve() == target.resolve():
        return
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(target)


def write_raw_dataset(raw: Path, train: list[str], test: list[str], source: Path = HEADNECK) -> Path:
    """Build (or check) ``raw/Dataset902_HeadNeckSplit``: symlinked imagesTr/labelsTr (``train``), imagesTs/labelsTs
    (``test``) and a dataset.json; returns the folder. A folder built for another split is a one-line error."""
    folder = raw / DATASET
    split_file = folder / "split.json"
    split = {"train": train, "test": test, "source": str(source)}
    if split_file.exists() and json.loads(split_file.read_text()) != split:
        raise SystemExit(f"{folder} was built for another split (see its split.json); use another --work")
    for sub, cases in (("Tr", train), ("Ts", test)):
        (folder / f"images{sub}").mkdir(parents=True, exist_ok=True)
        (folder / f"labels{sub}").mkdir(parents=True, exist_ok=True)
        for case in cases:
            _link(source / "imagesTr" / f"{case}_0000.nii.gz", folder / f"images{sub}" / f"{case}_0000.nii.gz")
            _link(source / "labelsTr" / f"{case}.nii.gz", folder / f"labels{sub}" / f"{case}.nii.gz")
    dataset = json.loads((source / "dataset.json").read_text())
    dataset.update({"name": DATASET, "numTraining": len(train),
                    "description": f"{source.name} split for bench_headneck_segmentation: training = all cases but "
                                   f"hn_{TEST_NUMBERS[0]}..hn_{TEST_NUMBERS[-1]} (imagesTs/labelsTs, the test set)"})
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=1))
    split_file.write_text(json.dumps(split, indent=1))
    return folder


def contoured(label_file: Path, organs: dict[str, int]) -> set[str]:
    """The organs of ``organs`` with at least one voxel in ``label_file`` (uncontoured organs are label 0 here)."""
    import SimpleITK as sitk

    present = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(label_file)))).tolist())
    return {name for name, value in organs.items() if value in present}


def nnunet_split(train: list[str]) -> list[dict]:
    """nnU-Net's own 5-fold split of ``train`` (``generate_crossval_split``, seed 12345: what nnU-Net writes)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    return generate_crossval_split(sorted(train), seed=12345, n_splits=5)


def choose_curve_cases(val: list[str], labels_dir: Path, organs: dict[str, int], k: int) -> list[str]:
    """The ``k`` validation cases that contour the most organs (ties by name): the learning curve's fixed cases."""
    count = {case: len(contoured(labels_dir / f"{case}.nii.gz", organs)) for case in val}
    return sorted(val, key=lambda c: (-count[c], c))[:k]


# ------------------------------------------------------------------------------------------------------- planning

def _multiple_below(n: int, step: int) -> int:
    """The largest multiple of ``step`` that is <= ``n`` (at least ``step``)."""
    return max(step, n // step * step)


def reduce_configuration(config: dict) -> dict:
    """A planned nnU-Net configuration with the benchmark's CPU reduction (see the module doc): the first <= 4 stages'
    kernels and strides, SMALL's widths and convolutions, patch capped at 64 voxels per axis; the rest unchanged."""
    out = json.loads(json.dumps(config))
    arch = out["architecture"]["arch_kwargs"]
    n = min(int(arch["n_stages"]), SMALL["n_stages"])
    strides = arch["strides"][:n]
    total = np.prod(np.asarray(strides), axis=0)
    arch.update({"n_stages": n, "features_per_stage": SMALL["features_per_stage"][:n], "kernel_sizes": arch["kernel_sizes"][:n],
                 "strides": strides, "n_conv_per_stage": SMALL["n_conv_per_stage"][:n],
                 "n_conv_per_stage_decoder": SMALL["n_conv_per_stage_decoder"][:n - 1]})
    out["patch_size"] = [_multiple_below(min(int(p), PATCH_CAP), int(s)) for p, s in zip(config["patch_size"], total)]
    return out


def write_reduced_plans(preprocessed: Path, configurations: list[str], source: str = "nnUNetPlans",
                        batch: int | None = None) -> dict:
    """``<source>CPU.json`` (``nnUNetPlansCPU.json``) beside ``<source>.json``: the same plans with
    ``configurations`` reduced (other configurations as planned), their batch at most ``batch`` when given.
    Returns the reduced plans."""
    plans = json.loads((preprocessed / f"{source}.json").read_text())
    plans["plans_name"] = reduced_name(source)
    for name in configurations:
        plans["configurations"][name] = reduce_configuration(plans["configurations"][name])
        if batch is not None:
            plans["configurations"][name] = cap_batch(plans["configurations"][name], batch)
    (preprocessed / f"{reduced_name(source)}.json").write_text(json.dumps(plans, indent=1))
    return plans


def reduced_name(source: str) -> str:
    """The reduced plans' identifier for planned plans ``source``: nnUNetPlans -> nnUNetPlansCPU."""
    return f"{source}CPU"


def plans_identifier(model: dict, settings: dict) -> str:
    """The plans a model trains with: its own planned plans (coarse) or nnUNetPlans, reduced unless ``planned``."""
    source = model.get("plans", "nnUNetPlans")
    return source if settings["architecture"] == "planned" else reduced_name(source)


def describe(config: dict) -> str:
    """Patch, batch, spacing and network of a plans configuration, in one line."""
    arch = config["architecture"]["arch_kwargs"]
    return (f"patch {'x'.join(map(str, config['patch_size']))}, batch {config['batch_size']}, spacing "
            f"{'x'.join(f'{s:.2f}' for s in config['spacing'])} mm, {arch['n_stages']} stages, features "
            f"{arch['features_per_stage']}, strides {arch['strides']}")


def prepare(work: Path, env: dict, processes: int, train_cases: int | None) -> dict:
    """Raw dataset, nnU-Net planning and preprocessing (3d_fullres), fold-0 split and the reduced plans; done once
    per ``work`` (``WORK/prepared.json`` marks it), later calls only check. Returns prepared.json's content."""
    marker = work / "prepared.json"
    train, test = split_cases()
    if train_cases is not None:
        train = train[:train_cases]
    write_raw_dataset(work / "nnUNet_raw", train, test)
    if marker.exists():
        return json.loads(marker.read_text())
    print(f"planning and preprocessing {len(train)} training cases (nnUNetv2_plan_and_preprocess -c 3d_fullres):", flush=True)
    _, seconds = _run(env, "nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", str(processes),
                      "-npfp", str(processes), "--verify_dataset_integrity")
    preprocessed = work / "nnUNet_preprocessed" / DATASET
    (preprocessed / "splits_final.json").write_text(json.dumps(nnunet_split(train), indent=1))
    reduced = write_reduced_plans(preprocessed, ["3d_fullres"])
    planned = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    info = {"plan_and_preprocess_seconds": round(seconds, 1), "train_cases": len(train), "test_cases": len(test),
            "planned_3d_fullres": describe(planned["configurations"]["3d_fullres"]),
            "reduced_3d_fullres": describe(reduced["configurations"]["3d_fullres"]), "machine": machine(),
            "date": date.today().isoformat()}
    marker.write_text(json.dumps(info, indent=1))
    return info


# ------------------------------------------------------------------------------------------------------- training

def trainer_classes() -> dict[str, type]:
    """The benchmark's trainer classes by name (registered in this module, so nnU-Net's workers can pickle them):
    the stock trainer, nnUNetTrainerAPECrop and nnUNetTrainerAPEChannels, each with the benchmark's mixin."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_ape.nnunet.trainers import nnUNetTrainerAPEChannels, nnUNetTrainerAPECrop

    bases = {TRAINER: (nnUNetTrainer, "Stock nnUNetTrainer"), CROP_TRAINER: (nnUNetTrainerAPECrop, "nnUNetTrainerAPECrop"),
             CHANNELS_TRAINER: (nnUNetTrainerAPEChannels, "nnUNetTrainerAPEChannels")}
    classes = {name: type(name, (ResumableTraining, base), {
        "__module__": __name__, "__qualname__": name,
        "__doc__": f"{what} with the benchmark's resumable epochs and learning curve."}) for name, (base, what) in bases.items()}
    globals().update(classes)
    return classes


TRAINER_SHIM = '''"""Generated by benchmarks/bench_headneck_segmentation.py: its trainers, for nnU-Net's nnUNet_extTrainer lookup."""
import sys
sys.path.insert(0, {benchmarks!r})
from bench_headneck_segmentation import trainer_classes
globals().update(trainer_classes())
'''


def stage_settings(work: Path, stage: str, args) -> dict:
    """The stage's training settings: stored at its first start in ``WORK/<stage>/settings.json``; a different
    explicit value later is a one-line error (nnU-Net's learning-rate schedule depends on them)."""
    file = work / stage / "settings.json"
    stored = json.loads(file.read_text()) if file.exists() else {}
    settings = {}
    for key, default in {**DEFAULTS, "architecture": "reduced"}.items():
        given = getattr(args, key)
        if key in stored and given is not None and given != stored[key]:
            raise SystemExit(f"stage {stage} was started with --{key.replace('_', '-')} {stored[key]}; it cannot change "
                             f"mid-run (start a new --work to change it)")
        settings[key] = stored.get(key, given if given is not None else default)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(settings, indent=1))
    return settings


def stage_models(work: Path, stage: str) -> list[dict]:
    """The nnU-Net models a stage trains: name, configuration, trainer, the organs it segments ({name: value}) and
    its training log. full, coarse, channels: one model of every organ; crop: one per organ group; oracle: none (the
    crop models)."""
    spec, organs = IMPLEMENTED[stage], organ_labels()
    if stage in WHOLE_IMAGE:
        return [{"name": stage, "configuration": spec["configuration"], "trainer": spec["trainer"], "organs": organs,
                 "log": work / stage / "training_log.jsonl", **({"plans": spec["plans"]} if "plans" in spec else {})}]
    if stage == "crop":
        return [{"name": group, "configuration": group_configuration(group), "trainer": spec["trainer"],
                 "organs": {o: organs[o] for o in GROUPS[group]}, "log": work / "crop" / group / "training_log.jsonl"}
                for group in spec["groups"]]
    return []


def model_folder(work: Path, model: dict, settings: dict) -> Path:
    """nnU-Net's results folder of a model of :func:`stage_models` (fold_0 inside)."""
    return work / "nnUNet_results" / DATASET / f"{model['trainer']}__{plans_identifier(model, settings)}__{model['configuration']}"


def is_trained(work: Path, stage: str, settings: dict) -> bool:
    """Whether every model of the stage (for oracle: of crop) has its final checkpoint."""
    models = stage_models(work, IMPLEMENTED[stage].get("models_of", stage))
    return all(model_trained(work, m, settings) for m in models)


def model_trained(work: Path, model: dict, settings: dict) -> bool:
    """Whether a model of :func:`stage_models` has its final checkpoint."""
    return (model_folder(work, model, settings) / "fold_0" / "checkpoint_final.pth").exists()


COARSE_FACTOR = 1.6  # the FLARE22 efficiency winner's ratio: 4 x 1.2 x 1.2 mm against about 2.5 x 0.8 x 0.8 mm


def prepare_coarse(work: Path, env: dict, processes: int) -> dict:
    """Stage coarse's plans, made by nnU-Net's own planner: ``nnUNetv2_plan_experiment -overwrite_target_spacing``
    (3d_fullres's spacing x :data:`COARSE_FACTOR` on every axis) as ``nnUNetPlans_coarse``, its preprocessing
    (``nnUNetv2_preprocess -c 3d_fullres``) and its CPU reduction ``nnUNetPlans_coarseCPU``. Done once per
    ``work`` (``WORK/coarse/prepared.json``); returns its content."""
    marker = work / "coarse" / "prepared.json"
    if marker.exists():
        return json.loads(marker.read_text())
    preprocessed = work / "nnUNet_preprocessed" / DATASET
    planned = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    transposed = planned["configurations"]["3d_fullres"]["spacing"]
    original = [transposed[i] * COARSE_FACTOR for i in planned["transpose_backward"]]  # the planner takes image axis order
    source = IMPLEMENTED["coarse"]["plans"]
    _, plan_seconds = _run(env, "nnUNetv2_plan_experiment", "-d", str(DATASET_ID), "-overwrite_target_spacing",
                           *[f"{s:.4f}" for s in original], "-overwrite_plans_name", source)
    _, seconds = _run(env, "nnUNetv2_preprocess", "-d", str(DATASET_ID), "-plans_name", source, "-c", "3d_fullres",
                      "-np", str(processes))
    # the same batch as the full-image model (nnU-Net plans 8 for the smaller coarse images: 4x the work per iteration)
    reduced = write_reduced_plans(preprocessed, ["3d_fullres"], source, planned["configurations"]["3d_fullres"]["batch_size"])
    coarse = json.loads((preprocessed / f"{source}.json").read_text())
    info = {"factor": COARSE_FACTOR, "planned": describe(coarse["configurations"]["3d_fullres"]),
            "trained": describe(reduced["configurations"]["3d_fullres"]), "plan_seconds": round(plan_seconds, 1),
            "preprocess_seconds": round(seconds, 1), "date": date.today().isoformat(), "machine": machine()}
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(info, indent=1))
    return info


def prepare_crops(work: Path, env: dict, settings: dict, localizer: Path | None, ape_model: Path | None,
                  processes: int) -> dict:
    """The crop configurations, made as a user makes them (module doc of :mod:`headneck_seg_crops`): the localizer
    (``localizer`` copied, or fitted with ``nnunet-ape localize fit`` on the 163 training cases, every case a shot,
    all-voxels boxes, from ``ape_model``), ``nnunet-ape plan --union`` per group, ``nnunet-ape preprocess`` for the
    groups together, then the CPU reduction with the batch capped at the full-image plan's. Done once per ``work``
    (``WORK/crop/prepared.json``); returns its content."""
    marker = work / "crop" / "prepared.json"
    if marker.exists():
        return json.loads(marker.read_text())
    from nnunet_ape.checkpoint import file_hash

    folder = work / "crop"
    folder.mkdir(parents=True, exist_ok=True)
    loc = folder / "localizer.json"
    seconds = {}
    if not loc.exists():
        if localizer is not None:
            shutil.copyfile(localizer, loc)
        elif ape_model is None:
            raise SystemExit("stage crop needs --localizer (a localizer fitted on the training cases) or --ape-model "
                             "(an APE checkpoint pretrained on them; the benchmark then fits the localizer)")
        else:
            shots = len(list((work / "nnUNet_raw" / DATASET / "imagesTr").glob("*_0000.nii.gz")))  # every training case
            _, seconds["localize_fit"] = _run(env, "nnunet-ape", "localize", "fit", "-d", str(DATASET_ID), "-m", str(ape_model),
                                              "--ape-boxes", "all-voxels", "--shots", str(shots), "-o", str(loc))
    plans = PLANS[settings["architecture"]]
    configurations = [group_configuration(g) for g in GROUPS]
    for group in GROUPS:
        _run(env, "nnunet-ape", "plan", "-d", str(DATASET_ID), "-p", plans, "-c", "3d_fullres", "-l", str(loc), "--organs",
             *GROUPS[group], "--union")
    _, seconds["preprocess"] = _run(env, "nnunet-ape", "preprocess", "-d", str(DATASET_ID), "-p", plans, "-c", *configurations,
                                    "-np", str(processes), "--device", "cpu")
    plans_file = work / "nnUNet_preprocessed" / DATASET / f"{plans}.json"
    content = json.loads(plans_file.read_text())
    described = {}
    for group, name in zip(GROUPS, configurations):
        config, base = content["configurations"][name], content["configurations"]["3d_fullres"]
        planned = describe({**base, **config})
        if settings["architecture"] == "reduced":
            config = cap_batch(reduce_configuration(config), base["batch_size"])
            content["configurations"][name] = config
        described[group] = {"configuration": name, "organs": GROUPS[group], "planned": planned, "trained": describe({**base, **config}),
                            "median_crop_voxels": config.get("median_image_size_in_voxels")}
    plans_file.write_text(json.dumps(content, indent=1))
    info = {"localizer": str(localizer or loc), "localizer_sha256": file_hash(loc), "seconds": seconds, "groups": described,
            "date": date.today().isoformat(), "machine": machine()}
    marker.write_text(json.dumps(info, indent=1))
    return info


def prepare_channels(work: Path, env: dict, settings: dict, ape_model: Path | None, bpr_model: Path | None,
                     processes: int) -> dict:
    """Stage channels' configuration, made as a user makes it: the BPR model (``bpr_model``, or a tiny trunk
    pretrained here on the training CTs, resumable), ``nnunet-ape plan --channels ape bpr`` on the (reduced)
    3d_fullres and ``nnunet-ape preprocess`` (one APE and one BPR pass per training case). Done once per ``work``
    (``WORK/channels/prepared.json``); returns its content."""
    marker = work / "channels" / "prepared.json"
    if marker.exists():
        return json.loads(marker.read_text())
    if ape_model is None:
        raise SystemExit("stage channels needs --ape-model (an APE checkpoint pretrained on the training cases)")
    from nnunet_ape.checkpoint import file_hash

    folder = work / "channels"
    folder.mkdir(parents=True, exist_ok=True)
    seconds = {}
    if bpr_model is None:
        run_dir = folder / "bpr"
        bpr_model = run_dir / "checkpoint_final.pt"
        if not bpr_model.exists():
            images = work / "nnUNet_raw" / DATASET / "imagesTr"  # the training split only
            resume = ["--resume"] if (run_dir / "checkpoint_last.pt").exists() else []
            _, seconds["bpr_pretrain"] = _run(env, "nnunet-ape", "pretrain", "bpr", "-i", str(images), "-o", str(run_dir),
                                              "--trunk", "tiny", "--iterations", str(BPR_ITERATIONS), "--lr-schedule",
                                              "cosine", "--workers", "1", "--checkpoint-every", "1000", *resume)
    plans = PLANS[settings["architecture"]]
    configuration = IMPLEMENTED["channels"]["configuration"]
    _run(env, "nnunet-ape", "plan", "-d", str(DATASET_ID), "-p", plans, "-c", "3d_fullres", "--channels", "ape", "bpr",
         "-m", str(ape_model), "--bpr-model", str(bpr_model))
    _, seconds["preprocess"] = _run(env, "nnunet-ape", "preprocess", "-d", str(DATASET_ID), "-p", plans, "-c", configuration,
                                    "-np", str(processes), "--device", "cpu")
    content = json.loads((work / "nnUNet_preprocessed" / DATASET / f"{plans}.json").read_text())
    base = content["configurations"]["3d_fullres"]
    info = {"configuration": configuration, "ape_model": str(ape_model), "ape_sha256": file_hash(ape_model),
            "bpr_model": str(bpr_model), "bpr_sha256": file_hash(bpr_model), "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "trained": describe({**base, **content["configurations"][configuration]}), "date": date.today().isoformat(),
            "machine": machine()}
    marker.write_text(json.dumps(info, indent=1))
    return info


def prepare_tight(work: Path, localizer: Path | None) -> None:
    """Stage crop_tight's localizer: ``localizer`` copied to ``WORK/crop_tight/localizer.json`` at the first start
    (later starts keep the copy; another file then is a one-line error)."""
    target = work / "crop_tight" / "localizer.json"
    if target.exists():
        if localizer is not None and Path(localizer).read_bytes() != target.read_bytes():
            raise SystemExit(f"stage crop_tight was started with another localizer ({target}); start a new --work to change it")
        return
    if localizer is None:
        raise SystemExit("stage crop_tight needs --tight-localizer (a localizer fitted on the training cases, e.g. with face margins)")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(localizer, target)


def train_model(work: Path, model: dict, settings: dict, env: dict, deadline: float | None, threads: int | None,
                device: str) -> bool:
    """Train (or continue) one model of :func:`stage_models` until its epochs are done or ``deadline`` (unix
    seconds); returns whether training is complete (checkpoint_final.pth exists)."""
    if model_trained(work, model, settings):
        return True
    fold = model_folder(work, model, settings) / "fold_0"
    raw = work / "nnUNet_raw" / DATASET
    split = json.loads((work / "nnUNet_preprocessed" / DATASET / "splits_final.json").read_text())
    curve_cases = choose_curve_cases(split[0]["val"], raw / "labelsTr", model["organs"], settings["curve_cases"])
    bench = {**{k: settings[k] for k in ("epochs", "iterations_per_epoch", "val_iterations", "curve_every")},
             "curve_cases": curve_cases, "deadline": deadline, "log": str(model["log"]),
             "curve_dir": str(model["log"].parent / "curve"), "labels_dir": str(raw / "labelsTr"), "organs": model["organs"],
             "threads": threads}
    model["log"].parent.mkdir(parents=True, exist_ok=True)
    resume = (fold / "checkpoint_latest.pth").exists()
    command = [str(Path(sys.executable).parent / "nnUNetv2_train"), str(DATASET_ID), model["configuration"], "0", "-tr",
               model["trainer"], "-p", plans_identifier(model, settings), "-device", device] + (["--c"] if resume else [])
    print(f"{model['name']}: {'continuing' if resume else 'starting'} training ({settings['epochs']} epochs of "
          f"{settings['iterations_per_epoch']} iterations; curve on {len(curve_cases)} fold-0 validation cases every "
          f"{settings['curve_every']} epochs): {' '.join(command[1:])}", flush=True)
    done = subprocess.run(command, env={**env, "BENCH_HN_SETTINGS": json.dumps(bench)})
    if done.returncode != 0:
        raise SystemExit(f"{model['name']}: nnUNetv2_train failed (exit {done.returncode}); its log is in {fold}")
    return model_trained(work, model, settings)


def train_stage(work: Path, stage: str, settings: dict, env: dict, deadline: float | None, threads: int | None,
                device: str) -> bool:
    """Train (or continue) the stage's models one after the other until done or ``deadline``; returns whether
    every model is trained. A model is not started or continued when an epoch as long as the stage's longest so far
    would end past ``deadline``."""
    models = stage_models(work, stage)
    for model in models:
        if not model_trained(work, model, settings) and not epoch_fits([m["log"] for m in models], deadline):
            return False
        if not train_model(work, model, settings, env, deadline, threads, device):
            return False
        records = read_log(model["log"])
        if records:
            r = records[-1]
            curve = next((x["curve"] for x in reversed(records) if "curve" in x), None)
            print(f"{model['name']}: {r['iterations']} iterations in {r['train_seconds'] / 3600:.2f} h of training "
                  f"({sum(x['epoch_seconds'] for x in records) / r['iterations']:.2f} s per iteration incl. nnU-Net's "
                  f"validation batches)" + (f"; latest curve Dice {curve['dice']}" if curve else ""), flush=True)
    return is_trained(work, stage, settings)


# ----------------------------------------------------------------------------------------------------- prediction

def predict_stock(model: Path, images: list[Path], out: Path, device: str, tta: bool, threads: int | None,
                  deadline: float | None = None, fold: int = 0) -> None:
    """Predict ``images`` with stock nnU-Net's ``nnUNetPredictor`` (``fold``, checkpoint_final) into ``out``, one case
    after another in this process, skipping cases already predicted and stopping before a case that would end after
    ``deadline`` (unix seconds; the last case's time as the estimate). Appends per case to ``out/timings.jsonl``:
    seconds of preprocessing (read + resample + normalize), network (sliding window, TTA if ``tta``) and export
    (resample back + write), and the process's peak memory so far. Run it in a process of its own."""
    import torch
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    if threads:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    todo = [p for p in images if not (out / p.name.replace("_0000.nii.gz", ".nii.gz")).exists()]
    if not todo:
        return
    began = time.perf_counter()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta, device=torch.device(device),
                                perform_everything_on_device=device == "cuda", verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), (fold,), "checkpoint_final.pth")
    load_seconds = time.perf_counter() - began
    pm, cm, dj = predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
    preprocessor = cm.preprocessor_class(verbose=False)
    last = 0.0
    for image in todo:
        if deadline is not None and time.time() + last > deadline:
            print(f"  budget spent: {len(todo) - todo.index(image)} cases left for the next run", flush=True)
            return
        case = image.name[: -len("_0000.nii.gz")]
        t0 = time.perf_counter()
        data, _, properties = preprocessor.run_case([str(image)], None, pm, cm, dj)
        t1 = time.perf_counter()
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
        t2 = time.perf_counter()
        # written under a hidden name and renamed: a run killed while writing leaves no file that counts as done
        export_prediction_from_logits(logits, properties, cm, pm, dj, str(out / f".partial_{case}"), False)
        os.replace(out / f".partial_{case}{dj['file_ending']}", out / f"{case}{dj['file_ending']}")
        t3 = time.perf_counter()
        gpu = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        record = {"case": case, "preprocess": round(t1 - t0, 3), "network": round(t2 - t1, 3), "export": round(t3 - t2, 3),
                  "case_seconds": round(t3 - t0, 3), "model_load_seconds": round(load_seconds, 3), "tta": tta,
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3), "peak_gpu_gib": gpu}
        with open(out / "timings.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        last = t3 - t0
        print(f"  {case}: {record['case_seconds']:.1f} s", flush=True)


def stock_predict_command(work: Path, stage: str, settings: dict, listing: Path, out: Path, device: str,
                          threads: int | None = None, deadline: float | None = None) -> list[str]:
    """The command that predicts the images of ``listing`` with a whole-image stage's model (full, coarse) through
    stock nnUNetPredictor (``predict-stock``) into ``out``."""
    model = stage_models(work, stage)[0]
    return [sys.executable, str(Path(__file__).resolve()), "predict-stock", "--model", str(model_folder(work, model, settings)),
            "--images", str(listing), "--out", str(out), "--device", device] + \
        (["--tta"] if IMPLEMENTED[stage]["tta"] else []) + (["--threads", str(threads)] if threads else []) + \
        (["--deadline", str(deadline)] if deadline is not None else [])


def localized_predict_command(work: Path, stage: str, settings: dict, images: list[Path], out: Path, record: Path,
                              device: str) -> list[str]:
    """The command that predicts ``images`` with the models of stage crop, crop_tight or channels (``nnunet-ape
    predict``, crop_tight with ``-l`` its localizer) or oracle (``predict-oracle``) into ``out``, in a process that
    writes its seconds and peak memory to ``record``."""
    models = stage_models(work, "channels" if stage == "channels" else "crop")  # oracle, crop_tight: the crop models
    configurations, trainer = [m["configuration"] for m in models], models[0]["trainer"]
    plans, tta = PLANS[settings["architecture"]], IMPLEMENTED[stage]["tta"]
    script = str(Path(__file__).resolve())
    if stage == "oracle":
        return [sys.executable, script, "predict-oracle", "--record", str(record), "--images", *map(str, images),
                "--labels", str(work / "nnUNet_raw" / DATASET / "labelsTs"), "--out", str(out), "--configurations",
                *configurations, "--plans", plans, "--device", device, "--localizer", str(work / "crop" / "localizer.json")] + \
            (["--tta"] if tta else [])
    listing = out / ".chunk.txt"
    listing.write_text("\n".join(map(str, images)) + "\n")
    return [sys.executable, script, "predict-measured", "--record", str(record), "--", "predict", "-i", str(listing), "-o",
            str(out), "-d", str(DATASET_ID), "-c", *configurations, "-tr", trainer, "-p", plans, "-f", "0", "--device",
            device] + ([] if tta else ["--disable_tta"]) + \
        (["-l", str(work / "crop_tight" / "localizer.json")] if stage == "crop_tight" else [])


def _predict_stock_stage(work: Path, stage: str, settings: dict, env: dict, listing: Path, out: Path, device: str,
                         threads: int | None, deadline: float | None) -> dict[str, dict]:
    """Stage full: stock nnUNetPredictor in a process of its own; returns the per-case timings."""
    command = stock_predict_command(work, stage, settings, listing, out, device, threads, deadline)
    if subprocess.run(command, env=env).returncode != 0:
        raise SystemExit(f"{stage}: prediction failed")
    timings = {}
    if (out / "timings.jsonl").exists():
        for line in (out / "timings.jsonl").read_text().splitlines():
            r = json.loads(line)
            timings[r["case"]] = r
    return timings


CHUNK = 5  # localized/oracle prediction runs this many cases per process, so --minutes can stop it between chunks


def _predict_localized_stage(work: Path, stage: str, settings: dict, env: dict, images: list[Path], out: Path,
                             device: str, deadline: float | None, test: list[str]) -> dict[str, dict]:
    """Stages crop (``nnunet-ape predict``, regrowth on), channels (``nnunet-ape predict``: embeddings + the whole
    image) and oracle (the crop models on ground-truth boxes), in processes of their own, :data:`CHUNK` cases each;
    returns the per-case timings with the process's peak memory."""
    from headneck_seg_crops import localized_timings

    tta = IMPLEMENTED[stage]["tta"]
    runs = out / "runs.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    todo = [im for im, c in zip(images, test) if not (out / f"{c}_boxes.json").exists()]
    last = 0.0
    for i in range(0, len(todo), CHUNK):
        if deadline is not None and time.time() + last > deadline:
            print(f"  budget spent: {len(todo) - i} cases left for the next run", flush=True)
            break
        chunk = todo[i:i + CHUNK]
        record = out / ".run.json"
        command = localized_predict_command(work, stage, settings, chunk, out, record, device)
        began = time.perf_counter()
        if subprocess.run(command, env=env).returncode != 0:
            raise SystemExit(f"{stage}: prediction failed")
        last = (time.perf_counter() - began) / len(chunk) * CHUNK
        with open(runs, "a") as f:
            f.write(json.dumps({"cases": [p.name for p in chunk], **json.loads(record.read_text())}) + "\n")
    peak = max((json.loads(line)["peak_rss_gib"] for line in runs.read_text().splitlines()), default=None) if runs.exists() else None
    timings = localized_timings(out, test)
    for t in timings.values():
        t.update({"tta": tta, "peak_rss_gib": peak})
    return timings


def evaluate_stage(work: Path, stage: str, settings: dict, env: dict, test: list[str], device: str, threads: int | None,
                   nsd_mm: tuple[float, ...], deadline: float | None) -> dict:
    """Predict the ``test`` cases with the stage's final model(s) (in processes of their own, until ``deadline``),
    score the predicted ones in the source geometry and write ``WORK/<stage>/test_scores.json`` (``complete`` says
    whether every case of ``test`` is in; crop and oracle add per case the fraction of each organ inside its final
    box, the regrowth and the faces still touched); returns its content."""
    from headneck_seg_crops import organ_box_fractions

    raw = work / "nnUNet_raw" / DATASET
    out = work / stage / "test_predictions"
    images = [raw / "imagesTs" / f"{c}_0000.nii.gz" for c in test]
    listing = work / stage / "test_images.txt"
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text("\n".join(map(str, images)) + "\n")
    how = {"full": "stock nnUNetPredictor", "coarse": "stock nnUNetPredictor", "crop": "nnunet-ape predict, regrowth on",
           "channels": "nnunet-ape predict, APE + BPR channels", "oracle": "crop models on ground-truth boxes enlarged as the localizer's",
           "crop_tight": "nnunet-ape predict -l (the tight localizer), regrowth on"}[stage]
    print(f"{stage}: predicting {len(test)} test cases ({how}, TTA {'on' if IMPLEMENTED[stage]['tta'] else 'off'})", flush=True)
    if stage in ("full", "coarse"):
        timings = _predict_stock_stage(work, stage, settings, env, listing, out, device, threads, deadline)
    else:
        timings = _predict_localized_stage(work, stage, settings, env, images, out, device, deadline, test)
    organs = organ_labels()
    done = [c for c in test if c in timings and (out / f"{c}.nii.gz").exists()]
    scores = {c: score_case(out / f"{c}.nii.gz", raw / "labelsTs" / f"{c}.nii.gz", organs, nsd_mm) for c in done}
    result = {"cases": done, "complete": len(done) == len(test), "scores": scores, "timings": {c: timings[c] for c in done},
              "nsd_mm": list(nsd_mm), "machine": machine(), "date": date.today().isoformat(), "device": device}
    if stage in LOCALIZED:
        result["organ_in_box"] = {c: organ_box_fractions(raw / "labelsTs" / f"{c}.nii.gz", timings[c]["boxes"], organs)
                                  for c in done}
    (work / stage / "test_scores.json").write_text(json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------------------------------------------------- report

def report(work: Path, stages: list[str]) -> str:
    """The benchmark's tables and learning-curve PNG from what exists (:func:`headneck_seg_report.report`)."""
    from headneck_seg_report import report as write_report

    return write_report(sys.modules[__name__], work, stages)


# ------------------------------------------------------------------------------------------------------------ main

def environment(work: Path, loader_processes: int, processes: int, threads: int | None) -> dict:
    """The environment of every nnU-Net command: its three folders in ``work``, the trainer module, process counts."""
    roots = {k: work / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for p in roots.values():
        p.mkdir(parents=True, exist_ok=True)
    ext = work / "ext"
    ext.mkdir(exist_ok=True)
    (ext / "bench_headneck_trainers.py").write_text(TRAINER_SHIM.format(benchmarks=str(BENCHMARKS)))
    env = {**os.environ, **{k: str(v) for k, v in roots.items()}, "nnUNet_extTrainer": str(ext),
           "nnUNet_n_proc_DA": str(loader_processes), "nnUNet_def_n_proc": str(processes)}
    if threads:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    return env


def run(args) -> None:
    """The ``run`` command: prepare, then per stage train (within the budget) and evaluate, then report."""
    began = time.time()
    deadline = began + 60 * args.minutes if args.minutes else None
    print(f"machine: {machine()}\nwork folder: {args.work}", flush=True)
    for stage in args.stages:
        if stage not in IMPLEMENTED:
            raise SystemExit(f"stage '{stage}' ({STAGES[stage]}) is not implemented yet; implemented: {', '.join(IMPLEMENTED)}")
    env = environment(args.work, args.loader_processes, args.processes, args.threads)
    info = prepare(args.work, env, args.processes, args.train_cases)
    print(f"prepared: {info['train_cases']} training / {info['test_cases']} test cases (planning + preprocessing took "
          f"{info['plan_and_preprocess_seconds']:.0f} s on {info['date']})\n  nnU-Net's plan: {info['planned_3d_fullres']}\n"
          f"  reduced (CPU): {info['reduced_3d_fullres']}", flush=True)
    if args.prepare_only:
        return
    _, test = split_cases()
    test = test[:args.test_cases] if args.test_cases is not None else test
    for stage in args.stages:
        if deadline is not None and time.time() > deadline:
            print(f"{stage}: the budget is spent; run again to continue", flush=True)
            break
        settings = stage_settings(args.work, IMPLEMENTED[stage].get("models_of", stage), args)
        if "models_of" in IMPLEMENTED[stage]:  # oracle, crop_tight: the crop models
            if not is_trained(args.work, stage, settings):
                print(f"{stage}: the crop models are not trained yet (run --stages crop first)", flush=True)
                continue
            if stage == "crop_tight":
                prepare_tight(args.work, args.tight_localizer)
        else:
            if stage == "coarse":
                print(f"coarse: {prepare_coarse(args.work, env, args.processes)['trained']}", flush=True)
            if stage == "channels":
                print(f"channels: {prepare_channels(args.work, env, settings, args.ape_model, args.bpr_model, args.processes)['trained']}",
                      flush=True)
            if stage == "crop":
                info = prepare_crops(args.work, env, settings, args.localizer, args.ape_model, args.processes)
                print("crop configurations: " + "; ".join(f"{g}: {d['trained']}" for g, d in info["groups"].items()), flush=True)
            if not train_stage(args.work, stage, settings, env, deadline, args.threads, args.device):
                print(f"{stage}: training not finished; run the same command again to continue", flush=True)
                continue
        if not test:
            continue
        if deadline is not None and time.time() > deadline:
            print(f"{stage}: trained; the budget is spent, evaluation on the next run", flush=True)
            continue
        result = evaluate_stage(args.work, stage, settings, env, test, args.device, args.threads, tuple(args.nsd_mm), deadline)
        if not result["complete"]:
            print(f"{stage}: {len(result['cases'])} of {len(test)} test cases predicted; run again to continue", flush=True)
    print("\n" + report(args.work, list(STAGES)), flush=True)
    png = args.work / "dice_vs_training_time.png"
    print(f"report: {args.work / 'report.md'}" + (f"; learning curve: {png}" if png.exists() else ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="prepare, train (resumable) and evaluate stages, then report")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=["full"],
                   help="models [full]: " + "; ".join(f"{k}: {v}" for k, v in STAGES.items()))
    p.add_argument("--work", type=Path, default=Path("/work/bench_headneck_seg"),
                   help="everything the benchmark writes (nnU-Net folders, logs, predictions, report); outside the "
                        "repository [/work/bench_headneck_seg]")
    p.add_argument("--minutes", type=float, help="budget of this invocation: training stops cleanly at an epoch end, "
                   "test prediction between cases, before it; run again to continue [no limit]")
    p.add_argument("--prepare-only", action="store_true", help="build the dataset, plan and preprocess, then stop")
    p.add_argument("--architecture", choices=tuple(PLANS), help="reduced: the CPU network of the module doc "
                   f"(plans {PLANS['reduced']}); planned: nnU-Net's own (for a GPU) [reduced]")
    p.add_argument("--epochs", type=int, help=f"epochs per model, fixed at the stage's first start [{DEFAULTS['epochs']}]")
    p.add_argument("--iterations-per-epoch", type=int, help=f"training iterations per epoch [{DEFAULTS['iterations_per_epoch']}]")
    p.add_argument("--val-iterations", type=int, help=f"nnU-Net's validation batches per epoch (pseudo Dice) [{DEFAULTS['val_iterations']}]")
    p.add_argument("--curve-every", type=int, help=f"learning-curve point every N epochs [{DEFAULTS['curve_every']}]")
    p.add_argument("--curve-cases", type=int, help=f"fold-0 validation cases of the learning curve [{DEFAULTS['curve_cases']}]")
    p.add_argument("--test-cases", type=int, help="evaluate on the first N test cases only (smoke checks; 0: no "
                   "evaluation) [all 40]")
    p.add_argument("--train-cases", type=int, help="smoke checks only: the first N training cases (a new --work)")
    p.add_argument("--nsd-mm", type=float, nargs="+", default=[2.0, 4.0], help="NSD tolerances in mm [2 4]: 2 mm is "
                   "below this cohort's 2.5-3.9 mm voxels, 4 mm about one voxel")
    p.add_argument("--localizer", type=Path, help="stage crop: a localizer JSON fitted on the 163 training cases "
                   "(copied into WORK/crop); without it the benchmark fits one from --ape-model")
    p.add_argument("--ape-model", type=Path, help="APE checkpoint pretrained on the training cases (the recipe in "
                   "docs/benchmarks.md): stage crop fits the localizer with it (nnunet-ape localize fit, all-voxels, every "
                   "case a shot) unless --localizer is given; stage channels embeds with it")
    p.add_argument("--tight-localizer", type=Path, help="stage crop_tight: the localizer its predictions use (copied at "
                   "its first start)")
    p.add_argument("--bpr-model", type=Path, help="stage channels: BPR checkpoint trained on the training cases [a tiny "
                   f"trunk pretrained here, {BPR_ITERATIONS} iterations]")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="[cpu]")
    p.add_argument("--threads", type=int, help="torch threads of training and prediction [nnU-Net's: all cores]")
    p.add_argument("--loader-processes", type=int, default=1, help="nnUNet_n_proc_DA: data-augmentation worker processes [1]")
    p.add_argument("--processes", type=int, default=1,
                   help="nnUNet_def_n_proc and plan_and_preprocess -np/-npfp: nnU-Net's other worker processes [1]")
    t = sub.add_parser("timing", help="prediction seconds of trained stages on the same test cases, side by side in "
                       "one run (headneck_seg_timing)")
    t.add_argument("--work", type=Path, default=Path("/work/bench_headneck_seg"))
    t.add_argument("--stages", nargs="+", default=["full", "crop", "crop_tight"], help="the first is the baseline "
                   "[full crop crop_tight]")
    t.add_argument("--cases", type=int, default=10, help="the first N test cases [10]")
    t.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    r = sub.add_parser("report", help="print and write the tables and the learning-curve PNG from what exists")
    r.add_argument("--work", type=Path, default=Path("/work/bench_headneck_seg"))
    s = sub.add_parser("predict-stock", help="internal: stock nnU-Net prediction of a list of images in this process")
    s.add_argument("--model", type=Path, required=True, help="nnU-Net results folder of the model (fold_0 inside)")
    s.add_argument("--images", type=Path, required=True, help="text file, one _0000 image per line")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--device", default="cpu")
    s.add_argument("--tta", action="store_true", help="nnU-Net's mirroring")
    s.add_argument("--threads", type=int)
    s.add_argument("--deadline", type=float, help="unix seconds: stop before a case that would end after it")
    s.add_argument("--fold", type=int, default=0, help="the model's fold [0]")
    m = sub.add_parser("predict-measured", help="internal: run 'nnunet-ape ARGS' in this process and record its peak memory")
    m.add_argument("--record", type=Path, required=True, help="JSON to write: seconds, peak RSS")
    m.add_argument("nnunet_ape_args", nargs=argparse.REMAINDER, help="-- then the nnunet-ape command line")
    o = sub.add_parser("predict-oracle", help="internal: the crop models on ground-truth boxes + margin")
    o.add_argument("--record", type=Path, required=True)
    o.add_argument("--images", type=Path, nargs="+", required=True, help="CASE_0000.nii.gz files")
    o.add_argument("--labels", type=Path, required=True, help="folder of CASE.nii.gz label maps")
    o.add_argument("--out", type=Path, required=True)
    o.add_argument("--configurations", nargs="+", required=True)
    o.add_argument("--plans", required=True)
    o.add_argument("--device", default="cpu")
    o.add_argument("--tta", action="store_true")
    o.add_argument("--localizer", type=Path, required=True, help="the crop stage's localizer (its enlargement per organ)")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args)
    elif args.command == "report":
        print(report(args.work, list(STAGES)))
    elif args.command == "timing":
        from headneck_seg_timing import run_timing

        print(run_timing(sys.modules[__name__], args.work, args.stages, args.cases, args.device,
                         environment(args.work, 1, 1, None)))
    elif args.command == "predict-measured":
        from headneck_seg_crops import predict_measured

        given = args.nnunet_ape_args
        predict_measured(given[1:] if given[:1] == ["--"] else given, args.record)
    elif args.command == "predict-oracle":
        from headneck_seg_crops import predict_oracle

        began = time.perf_counter()
        predict_oracle(DATASET, args.configurations, CROP_TRAINER, args.plans, args.images, args.labels, args.out,
                       args.device, args.tta, args.localizer)
        args.record.write_text(json.dumps({"seconds": round(time.perf_counter() - began, 2),
                                           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}))
    else:
        images = [Path(line) for line in args.images.read_text().splitlines() if line.strip()]
        predict_stock(args.model, images, args.out, args.device, args.tta, args.threads, args.deadline, args.fold)


if __name__ == "__main__":
    main()
