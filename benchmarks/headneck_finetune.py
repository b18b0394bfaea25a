"""Few labels on real CT (issue 31): nnU-Net fine-tuned from APE pretraining against nnU-Net from scratch, on the
head-and-neck cohort. Run by ``bench_pretrain_finetune.py --cohort headneck``; resumable (run the same command again
and it continues; ``--minutes`` bounds one invocation: a run stops at an epoch end, and no run starts or
continues when an epoch as long as the longest logged so far would end past the budget: ``resumable_training.epoch_fits``).

1. Data: the split and preparation of :mod:`bench_headneck_segmentation` in WORK (``Dataset902_HeadNeckSplit``:
   imagesTr the 163 training cases, imagesTs/labelsTs the 40 test cases hn_169..hn_214), nnU-Net's own plan and
   preprocessing of 3d_fullres and the same CPU reduction (``nnUNetPlansCPU``): every run below uses these plans.
2. Pretraining: ``nnUNetTrainerAPEPretrain`` on fold 0 of nnU-Net's split of the 163 training cases (training CTs
   only, labels unused), ``--pretrain-iterations`` iterations (epochs of 25), a checkpoint every epoch.
3. Fine-tuning: per number of labeled cases k (``--labeled``, default 2 5 10 20) and seed (``--seeds`` seeds for
   k <= 5, one above), k training cases that contour all 7 organs, drawn with the seed, never one of the 8 fixed
   learning-curve cases; per variant stock ``nnUNetTrainer`` (with the segmentation benchmark's resumable epochs and
   learning curve) for ``--finetune-iterations``, the same plans, cases, seed and iterations:
     scratch     random initialisation;
     ape         ``-pretrained_weights`` from step 2 (nnU-Net's loader: every weight but the segmentation heads);
     ape_reinit  the same, then the last decoder stage re-initialised as well: the check of the issue's suspect, that
                 the pretrained decoder's output statistics slow the start of fine-tuning.
     ape_rescaled ape_reinit with nnU-Net's initialisation for the reset part, then every convolution that a norm
                 follows scaled back to the weight norm nnU-Net's initialisation gives it
                 (:func:`finetune_starts.rescale_to_init_norms`): the network computes the same, but SGD's relative
                 step on such a weight shrinks with its norm, which the cohort's APE pretraining grew 1.4-2.3x in
                 the two highest-resolution encoder stages and 1.5-1.6x in the middle decoder stage.
     ape_matched ape_reinit with nnU-Net's initialisation for the reset part, then every output channel of those
                 convolutions scaled so that its output spreads on a training batch as in a freshly initialised
                 network (:func:`finetune_starts.match_output_spread`): at the same norm a pretrained filter's
                 output spreads 2.5-8.6x more than a random one's, and the norm after it divides the gradient by
                 that spread (the cohort's APE start at nnU-Net's norms got 2.4-45x smaller relative gradients
                 than scratch: ``finetune_start_probe``).
     ape_warmup  the plugin's ``nnUNetTrainerFinetune``, nnU-Net's own fine-tuning recipe (``PretrainedTrainer`` on
                 nnU-Net's GitHub main, the path nnssl's checkpoints take): the encoder and stem from step 2, the
                 decoder fresh, learning rate 1e-3 instead of 1e-2, raised linearly per iteration over the first 5% of
                 the epochs (nnU-Net: 50 of 1000), then nnU-Net's poly decay from there.
     channels    the same pretraining minutes used the other way (item 2 of the issue): the standalone ``nnunet-ape
                 pretrain ape`` (the CPU recipe of ``bench_headneck.RECIPE``) on the same fold-0 training CTs for as
                 long as step 2 took (its measured seconds), then ``nnunet-ape plan --channels ape`` (the same reduced
                 plans, configuration ``3d_fullres_ape``: CT + the 3 APE channels) and ``nnUNetTrainerAPEChannels``
                 from random initialisation; test cases predicted with ``nnunet-ape predict`` (embeddings included).
   Learning curve: every ``--curve-every`` epochs nnU-Net's validation path predicts the 8 curve cases (training
   split, not the test cases; no mirroring) and Dice per organ is scored in the source geometry.
4. Each finished run predicts the 40 test cases (stock ``nnUNetPredictor``, fold of the run, no mirroring) and scores
   Dice per organ in the source geometry (an organ a case does not contour is skipped for it).
5. ``WORK/finetune/report.md``: k x variant x organ, mean over seeds with the spread, and each run's last epoch
   (losses, pseudo Dice, the organ volume it predicts: :func:`finetune_report.training_view`);
   ``WORK/finetune/curves.png``: curve Dice against iterations per k and variant (:mod:`finetune_report`).

The trainers of steps 2 and 3 are in :mod:`finetune_trainers`.

The schedule is a small fraction of nnU-Net's (1000 epochs of 250 iterations): the report says how small.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Callable

import numpy as np

import bench_headneck_segmentation as seg
import resumable_training as rt
from bench_embed import machine
from finetune_report import RUNS, report, run_logs
from finetune_trainers import PRETRAIN_TRAINER, TRAINER_SHIM, VARIANTS

PLANS = seg.PLANS["reduced"]
CONFIGURATION = "3d_fullres"
CHANNELS_CONFIGURATION = "3d_fullres_ape"  # nnunet-ape plan --channels ape on CONFIGURATION
STANDALONE_ITERATIONS = 100_000  # an upper bound: the standalone APE pretraining ends by the clock (its cosine follows it)


def configuration_of(variant: str) -> str:
    """The plans configuration a variant trains: the APE-channel one for ``channels``, else 3d_fullres."""
    return CHANNELS_CONFIGURATION if variant == "channels" else CONFIGURATION


# --------------------------------------------------------------------------------------------------------- splits

def complete_cases(labels_dir: Path, cases: list[str], organs: dict[str, int]) -> list[str]:
    """The ``cases`` whose label file contours every organ of ``organs``."""
    return [c for c in cases if seg.contoured(labels_dir / f"{c}.nii.gz", organs) == set(organs)]


def draw_labeled(pool: list[str], k: int, seed: int) -> list[str]:
    """``k`` cases of ``pool`` drawn with ``seed`` (sorted); the same (k, seed) always gives the same cases, and a
    larger k with the same seed contains the smaller draw's cases."""
    order = [str(c) for c in np.random.default_rng(seed).permutation(sorted(pool))]
    if k > len(order):
        raise SystemExit(f"{k} labeled cases asked for; only {len(order)} training cases contour every organ")
    return sorted(order[:k])


def register_folds(work: Path, runs: list[tuple[int, int]], train: dict[tuple[int, int], list[str]], val: list[str]) -> dict:
    """nnU-Net folds for the (k, seed) runs, kept in ``WORK/finetune/folds.json`` (fold 0 stays nnU-Net's split;
    a new (k, seed) gets the next fold) and written into splits_final.json; returns ``{"k{k}_s{seed}": fold}``."""
    registry_file = work / "finetune" / "folds.json"
    registry = json.loads(registry_file.read_text()) if registry_file.exists() else {}
    for k, seed in runs:
        registry.setdefault(f"k{k}_s{seed}", {"fold": len(registry) + 1, "train": train[(k, seed)], "val": val})
    splits_file = work / "nnUNet_preprocessed" / seg.DATASET / "splits_final.json"
    splits = json.loads(splits_file.read_text())[:1]
    splits += [{"train": e["train"], "val": e["val"]} for e in sorted(registry.values(), key=lambda e: e["fold"])]
    splits_file.write_text(json.dumps(splits, indent=1))
    registry_file.parent.mkdir(parents=True, exist_ok=True)
    registry_file.write_text(json.dumps(registry, indent=1))
    return {name: e["fold"] for name, e in registry.items()}


# ------------------------------------------------------------------------------------------------------ the steps

def results_folder(work: Path, trainer: str, configuration: str = CONFIGURATION) -> Path:
    return work / "nnUNet_results" / seg.DATASET / f"{trainer}__{PLANS}__{configuration}"


def fold_folder(work: Path, variant: str, fold: int) -> Path:
    """The nnU-Net results folder of one fine-tuning run (``.../fold_N``: its checkpoints and log)."""
    return results_folder(work, VARIANTS[variant], configuration_of(variant)) / f"fold_{fold}"


def pretrain_seconds(work: Path) -> float | None:
    """Wall seconds step 2 took over its invocations (``WORK/finetune/pretrain_seconds.jsonl``), None until it
    finished."""
    file = work / "finetune" / "pretrain_seconds.jsonl"
    records = [json.loads(line) for line in file.read_text().splitlines()] if file.exists() else []
    if not any(r["finished"] for r in records):
        return None
    return float(sum(r["seconds"] for r in records))


def pretrain_standalone(work: Path, seconds: float, deadline: float | None) -> Path | None:
    """The channels variant's APE model: ``nnunet-ape pretrain ape`` with the CPU recipe on fold 0's training CTs
    for ``seconds`` (step 2's wall time; one invocation, skipped while the budget has less left); returns its
    final checkpoint, or None when it did not run."""
    from bench_headneck import RECIPE, pretrain as pretrain_ape

    run_dir = work / "finetune" / "ape_standalone"
    final = run_dir / "checkpoint_final.pt"
    if final.exists():
        return final
    if deadline is not None and time.time() + seconds > deadline:
        print(f"standalone APE pretraining ({seconds / 60:.1f} min) does not fit this budget; next run", flush=True)
        return None
    split = json.loads((work / "nnUNet_preprocessed" / seg.DATASET / "splits_final.json").read_text())[0]["train"]
    images = [work / "nnUNet_raw" / seg.DATASET / "imagesTr" / f"{c}_0000.nii.gz" for c in split]
    print(f"standalone APE pretraining on {len(images)} training CTs for {seconds / 60:.1f} minutes (step 2's time)", flush=True)
    reached = pretrain_ape(images, run_dir, STANDALONE_ITERATIONS, seconds / 60, reuse=True, recipe=RECIPE)
    (work / "finetune" / "ape_standalone.json").write_text(json.dumps({**reached, "budget_seconds": round(seconds, 1)}, indent=1))
    return final


def prepare_channels(work: Path, env: dict, ape_model: Path, processes: int) -> None:
    """``nnunet-ape plan --channels ape`` on the reduced 3d_fullres with ``ape_model`` and ``nnunet-ape preprocess``
    of its configuration; once per ``work`` (``WORK/finetune/channels_prepared.json``)."""
    marker = work / "finetune" / "channels_prepared.json"
    if marker.exists():
        return
    seg._run(env, "nnunet-ape", "plan", "-d", str(seg.DATASET_ID), "-p", PLANS, "-c", CONFIGURATION, "--channels", "ape",
             "-m", str(ape_model))
    _, seconds = seg._run(env, "nnunet-ape", "preprocess", "-d", str(seg.DATASET_ID), "-p", PLANS, "-c",
                          CHANNELS_CONFIGURATION, "-np", str(processes), "--device", "cpu")
    marker.write_text(json.dumps({"ape_model": str(ape_model), "preprocess_seconds": round(seconds, 1)}, indent=1))


def pretrain(work: Path, env: dict, settings: dict, deadline: float | None, device: str) -> Path | None:
    """Step 2; returns the final checkpoint, or None when the budget ended first."""
    fold = results_folder(work, PRETRAIN_TRAINER) / "fold_0"
    final = fold / "checkpoint_final.pth"
    if final.exists():
        return final
    resume = (fold / "checkpoint_latest.pth").exists()
    print(f"APE pretraining ({settings['pretrain_iterations']} iterations, {'continuing' if resume else 'starting'})", flush=True)
    command = [str(Path(sys.executable).parent / "nnUNetv2_train"), str(seg.DATASET_ID), CONFIGURATION, "0", "-tr",
               PRETRAIN_TRAINER, "-p", PLANS, "-device", device] + (["--c"] if resume else [])
    began = time.perf_counter()
    bench = {"pretrain_iterations": settings["pretrain_iterations"], "seed": 0, "deadline": deadline}
    if subprocess.run(command, env={**env, "BENCH_FT_SETTINGS": json.dumps(bench)}).returncode != 0:
        raise SystemExit(f"APE pretraining failed; its log is in {fold}")
    with open(work / "finetune" / "pretrain_seconds.jsonl", "a") as f:
        f.write(json.dumps({"seconds": round(time.perf_counter() - began, 1), "finished": final.exists()}) + "\n")
    return final if final.exists() else None


def finetune(work: Path, env: dict, settings: dict, variant: str, k: int, seed: int, fold: int, curve_cases: list[str],
             pretrained: Path | None, deadline: float | None, device: str, threads: int | None,
             compiled: bool = False) -> bool:
    """Step 3 for one run; returns whether its training is finished. ``compiled``: torch.compile the network also
    on CPU (the mixin's ``compile`` setting; it changes the speed, not the schedule, so runs may switch)."""
    trainer = VARIANTS[variant]
    folder = fold_folder(work, variant, fold)
    if (folder / "checkpoint_final.pth").exists():
        return True
    run_dir = work / "finetune" / f"{variant}_k{k}_s{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    raw = work / "nnUNet_raw" / seg.DATASET
    bench = {"epochs": settings["epochs"], "iterations_per_epoch": settings["iterations_per_epoch"],
             "val_iterations": settings["val_iterations"], "curve_every": settings["curve_every"],
             "curve_cases": curve_cases, "deadline": deadline, "log": str(run_dir / "training_log.jsonl"),
             "curve_dir": str(run_dir / "curve"), "labels_dir": str(raw / "labelsTr"), "organs": seg.organ_labels(),
             "threads": threads, "seed": seed, "compile": compiled}
    resume = (folder / "checkpoint_latest.pth").exists()
    command = [str(Path(sys.executable).parent / "nnUNetv2_train"), str(seg.DATASET_ID), configuration_of(variant), str(fold),
               "-tr", trainer, "-p", PLANS, "-device", device]
    if resume:
        command.append("--c")
    elif variant not in ("scratch", "channels"):
        command += ["-pretrained_weights", str(pretrained)]
    print(f"{variant}, {k} labeled, seed {seed} (fold {fold}): {'continuing' if resume else 'starting'}", flush=True)
    if subprocess.run(command, env={**env, "BENCH_HN_SETTINGS": json.dumps(bench)}).returncode != 0:
        raise SystemExit(f"{variant} k={k} seed={seed}: nnUNetv2_train failed; its log is in {folder}")
    return (folder / "checkpoint_final.pth").exists()


def evaluate(work: Path, env: dict, variant: str, k: int, seed: int, fold: int, test: list[str], device: str,
             threads: int | None, deadline: float | None) -> dict | None:
    """Step 4 for one finished run; returns ``WORK/finetune/RUN/test_scores.json``'s content, or None while test
    cases are left (the budget ended)."""
    from nnunet_ape.segmentation_scores import mean_per_organ, score_case

    run_dir = work / "finetune" / f"{variant}_k{k}_s{seed}"
    scores_file = run_dir / "test_scores.json"
    if scores_file.exists():
        return json.loads(scores_file.read_text())
    raw = work / "nnUNet_raw" / seg.DATASET
    out = run_dir / "test_predictions"
    listing = run_dir / "test_images.txt"
    listing.write_text("\n".join(str(raw / "imagesTs" / f"{c}_0000.nii.gz") for c in test) + "\n")
    # nnU-Net caps its prediction's torch threads at nnUNet_def_n_proc, which env sets to the preprocessing process
    # count (1 by default); only Dice is reported here, so prediction gets every core
    env = {**env, "nnUNet_def_n_proc": str(threads or os.cpu_count() or 1)}
    if variant == "channels":  # nnunet-ape predict embeds each case itself; cases left by a stop are predicted next run
        todo = [c for c in test if not (out / f"{c}.nii.gz").exists()]
        if todo and (deadline is None or time.time() < deadline):
            listing.write_text("\n".join(str(raw / "imagesTs" / f"{c}_0000.nii.gz") for c in todo) + "\n")
            command = [str(Path(sys.executable).parent / "nnunet-ape"), "predict", "-i", str(listing), "-o", str(out), "-d",
                       str(seg.DATASET_ID), "-c", CHANNELS_CONFIGURATION, "-tr", VARIANTS[variant], "-p", PLANS, "-f",
                       str(fold), "--device", device, "--disable_tta"]
            if subprocess.run(command, env=env).returncode != 0:
                raise SystemExit(f"{variant} k={k} seed={seed}: test prediction failed")
    else:
        command = [sys.executable, str(Path(seg.__file__).resolve()), "predict-stock", "--model",
                   str(results_folder(work, VARIANTS[variant])), "--images", str(listing), "--out", str(out), "--device", device,
                   "--fold", str(fold)] + (["--threads", str(threads)] if threads else []) + \
            (["--deadline", str(deadline)] if deadline is not None else [])
        if subprocess.run(command, env=env).returncode != 0:
            raise SystemExit(f"{variant} k={k} seed={seed}: test prediction failed")
    done = [c for c in test if (out / f"{c}.nii.gz").exists()]
    if len(done) < len(test):
        return None
    organs = seg.organ_labels()
    scores = {c: score_case(out / f"{c}.nii.gz", raw / "labelsTs" / f"{c}.nii.gz", organs, (2.0,)) for c in test}
    result = {"variant": variant, "labeled": k, "seed": seed, "fold": fold, "scores": scores,
              "dice": {o: m for o, (m, _) in mean_per_organ(scores, list(organs), "dice").items()},
              "machine": machine(), "date": date.today().isoformat()}
    scores_file.write_text(json.dumps(result, indent=1))
    return result


# ------------------------------------------------------------------------------------------ reuse a pretraining

ADOPTED = "pretraining_from.json"  # WORK/finetune/: written last, once the copy is complete


def adopt_pretraining(source: Path, work: Path) -> dict:
    """Start ``work`` from the finished steps 1-2 of another work folder ``source`` (``--pretraining-from``): its
    prepared dataset (nnU-Net plans, preprocessed data, split; a different ``--train-cases`` is then refused), its
    pretraining checkpoint and seconds, and its standalone APE model and channel preparation where present, copied
    (not linked: the runs rewrite some of these files), so that a new fine-tuning schedule does not pay for
    pretraining again. Paths of ``source`` inside copied JSON files are rewritten to ``work``. A rerun with the same
    ``source`` is a no-op; a ``work`` that has data of its own, or a ``source`` whose pretraining has not finished,
    is a one-line error. Returns the record written to ``WORK/finetune/pretraining_from.json`` (source, pretraining
    iterations and seconds)."""
    source, work = source.resolve(), work.resolve()
    marker = work / "finetune" / ADOPTED
    if marker.exists():
        record = json.loads(marker.read_text())
        if record["source"] != str(source):
            raise SystemExit(f"{work} was started from the pretraining of {record['source']}; use another --work")
        return record
    pretrained = results_folder(source, PRETRAIN_TRAINER) / "fold_0"
    seconds = pretrain_seconds(source)
    if not (pretrained / "checkpoint_final.pth").exists() or seconds is None:
        raise SystemExit(f"--pretraining-from {source}: its APE pretraining has not finished there (no {pretrained}/"
                         "checkpoint_final.pth); run that work folder first")
    if source == work or (work / "prepared.json").exists() or (work / "finetune" / "settings.json").exists():
        raise SystemExit(f"--pretraining-from needs a new --work; {work} already has data of its own")
    carried = [f"nnUNet_raw/{seg.DATASET}/split.json", f"nnUNet_preprocessed/{seg.DATASET}",
               str(pretrained.parent.relative_to(source)), "finetune/pretrain_seconds.jsonl", "finetune/ape_standalone",
               "finetune/ape_standalone.json", "finetune/channels_prepared.json", "prepared.json"]  # prepared.json last: it marks the data as ready
    for name in carried:
        _copy_rewritten(source / name, work / name, source, work)
    stored = json.loads((source / "finetune" / "settings.json").read_text())
    (work / "finetune" / "settings.json").write_text(json.dumps({"pretrain_iterations": stored["pretrain_iterations"]}, indent=1))
    record = {"source": str(source), "pretrain_iterations": stored["pretrain_iterations"], "pretrain_seconds": seconds}
    marker.write_text(json.dumps(record, indent=1))
    return record


def _copy_rewritten(src: Path, dst: Path, source: Path, work: Path) -> None:
    """Copy file or folder ``src`` to ``dst`` (replacing what a killed earlier copy left); in JSON files, the
    absolute path ``source`` becomes ``work``. A missing ``src`` is skipped."""
    if not src.exists():
        return
    if dst.is_dir():
        shutil.rmtree(dst)
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    for file in files:
        target = dst / file.relative_to(src) if src.is_dir() else dst
        target.parent.mkdir(parents=True, exist_ok=True)
        if file.suffix == ".json":
            text = file.read_text().replace(f'"{source}"', f'"{work}"').replace(f'"{source}/', f'"{work}/')
            target.write_text(text)
        else:
            shutil.copy2(file, target)


# ---------------------------------------------------------------------------------------------------- run, report

DEFAULTS = {"pretrain_iterations": 1000, "epochs": 20, "iterations_per_epoch": 50, "val_iterations": 5, "curve_every": 4,
            "curve_cases": 8}


def settings_of(work: Path, given: dict) -> dict:
    """The run's schedule, fixed at its first start in ``WORK/finetune/settings.json`` (a different explicit value
    later is a one-line error: nnU-Net's learning-rate schedule depends on it)."""
    file = work / "finetune" / "settings.json"
    stored = json.loads(file.read_text()) if file.exists() else {}
    out = {}
    for key, default in DEFAULTS.items():
        value = given.get(key)
        if key in stored and value is not None and value != stored[key]:
            raise SystemExit(f"this work folder was started with --{key.replace('_', '-')} {stored[key]}; it cannot change "
                             "(start a new --work to change it)")
        out[key] = stored.get(key, value if value is not None else default)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(out, indent=1))
    return out


def planned_runs(labeled: list[int], seeds: int) -> list[tuple[int, int]]:
    """(k, seed) pairs: ``seeds`` seeds for k <= 5, one seed above."""
    return [(k, s) for k in sorted(labeled) for s in range(seeds if k <= 5 else 1)]


def run(args) -> None:
    """Steps 1-5 within ``args.minutes``; run again to continue."""
    began = time.time()
    deadline = began + 60 * args.minutes if args.minutes else None
    work = args.work
    print(f"machine: {machine()}\nwork folder: {work}\ndate: {date.today().isoformat()}", flush=True)
    env = seg.environment(work, args.loader_processes, args.processes, args.threads)
    (work / "ext" / "bench_finetune_trainers.py").write_text(TRAINER_SHIM.format(benchmarks=str(Path(__file__).resolve().parent)))
    if args.pretraining_from is not None:
        adopted = adopt_pretraining(args.pretraining_from, work)
        print(f"data and APE pretraining ({adopted['pretrain_iterations']} iterations, {adopted['pretrain_seconds'] / 60:.0f} "
              f"min) taken from {adopted['source']}", flush=True)
    info = seg.prepare(work, env, args.processes, args.train_cases)
    print(f"prepared: {info['train_cases']} training / {info['test_cases']} test cases; trained network: "
          f"{info['reduced_3d_fullres']}", flush=True)
    settings = settings_of(work, {"pretrain_iterations": args.pretrain_iterations, "epochs": args.epochs,
                                  "iterations_per_epoch": args.iterations_per_epoch, "curve_every": args.curve_every})
    organs = seg.organ_labels()
    raw = work / "nnUNet_raw" / seg.DATASET
    splits = json.loads((work / "nnUNet_preprocessed" / seg.DATASET / "splits_final.json").read_text())
    curve_cases = seg.choose_curve_cases(splits[0]["val"], raw / "labelsTr", organs, settings["curve_cases"])
    train, test = seg.split_cases()
    test = test[: args.test_cases] if args.test_cases is not None else test
    pool = [c for c in complete_cases(raw / "labelsTr", sorted(p.name[:-12] for p in (raw / "imagesTr").glob("*_0000.nii.gz")), organs)
            if c not in curve_cases]
    runs = planned_runs(args.labeled, args.seeds)
    draws = {(k, s): draw_labeled(pool, k, s) for k, s in runs}
    folds = register_folds(work, runs, draws, curve_cases)
    print(f"{len(pool)} training cases contour all {len(organs)} organs (the labeled pool; the {len(curve_cases)} curve "
          f"cases left out); runs: " + ", ".join(f"k={k} seed {s}" for k, s in runs), flush=True)
    pretrained = pretrain(work, env, settings, deadline, args.device) if set(args.variants) - {"scratch"} else None
    channels_ready = False
    if "channels" in args.variants and pretrained is not None:
        seconds = pretrain_seconds(work)
        if seconds is None:
            raise SystemExit("channels: the APE pretraining's time is not recorded in WORK/finetune/pretrain_seconds.jsonl; "
                             "run the channels variant in a new --work")
        standalone = pretrain_standalone(work, seconds, deadline)
        if standalone is not None:
            prepare_channels(work, env, standalone, args.processes)
            channels_ready = True
    jobs = [(variant, k, seed) for k, seed in runs for variant in args.variants
            if not (variant != "scratch" and pretrained is None or variant == "channels" and not channels_ready)]

    def train_and_test(variant: str, k: int, seed: int) -> bool:
        fold = folds[f"k{k}_s{seed}"]
        trained = (fold_folder(work, variant, fold) / "checkpoint_final.pth").exists()
        if not trained and not rt.epoch_fits(run_logs(work), deadline):  # every run has the same plans
            return False
        if finetune(work, env, settings, variant, k, seed, fold, curve_cases, pretrained, deadline, args.device, args.threads,
                    args.compile):
            if deadline is None or time.time() < deadline:
                evaluate(work, env, variant, k, seed, fold, test, args.device, args.threads, deadline)
        return True

    if not all(run_jobs(jobs, train_and_test, args.parallel)):
        print("budget spent; run the same command again to continue", flush=True)
    return finish(work)


def run_jobs(jobs: list[tuple], job: Callable[..., bool], parallel: int = 1) -> list[bool]:
    """``job(*args)`` for each tuple in ``jobs``, in order; returns each one's result (False: it did not start, the
    budget was spent). One at a time (``parallel`` 1) the first False ends the list; with ``parallel`` > 1 that many
    run at once in threads (each job's work is a subprocess: an nnU-Net training per run, e.g. several on one GPU),
    and every job is tried. An exception in a job is raised here."""
    if parallel <= 1:
        results = []
        for args in jobs:
            results.append(job(*args))
            if not results[-1]:
                break
        return results
    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda args: job(*args), jobs))


def finish(work: Path) -> None:
    text = report(work)
    print("\n" + text, flush=True)


RECORD_FILES = ("finetune/settings.json", "finetune/folds.json", "finetune/pretrain_seconds.jsonl",
                "finetune/ape_standalone.json", "finetune/report.md", "finetune/curves.png",
                f"finetune/{RUNS}/training_log.jsonl", f"finetune/{RUNS}/test_scores.json")


def record(work: Path, dest: Path) -> list[Path]:
    """Copy what the report is built from (``RECORD_FILES``: the settings, the fold registry, each run's training log
    and test scores, the report and its plot; a few hundred kB, no checkpoint) from WORK to DEST in the same layout,
    so that ``--report --work DEST`` rewrites the report after WORK is gone. A record cannot resume a run. Each file
    is written atomically (:func:`nnunet_ape.atomic.atomic_path`), so a killed copy leaves the previous one whole.
    Returns the files written (paths under DEST)."""
    from nnunet_ape.atomic import atomic_path

    written = []
    for pattern in RECORD_FILES:
        for source in sorted(work.glob(pattern)):
            target = dest / source.relative_to(work)
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
            written.append(target)
    return written

