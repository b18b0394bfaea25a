"""Benchmark: nnU-Net segmentation with few labeled cases, from scratch vs initialised from nnUNetTrainerAPEPretrain.

``--cohort headneck`` runs the resumable few-label benchmark of :mod:`headneck_finetune` (the README's split: APE
pretraining on the 163 training CTs, fine-tuning on 2/5/10/20 labeled training cases with 2 seeds for the smallest
counts, scratch / APE / APE with the last decoder stage re-initialised / nnU-Net's fine-tuning recipe (encoder
init, warm-up) / the same pretraining minutes spent on a
standalone APE model whose embeddings are input channels, test Dice on the 40 held-out cases, learning curves); run it again to continue, ``--minutes`` bounds one invocation, ``--report`` only rewrites the report:

    python benchmarks/bench_pretrain_finetune.py --cohort headneck --minutes 120 [--work /work/bench_hn_finetune]

A longer fine-tuning schedule on the same pretraining (--epochs and friends are fixed per work folder):

    python benchmarks/bench_pretrain_finetune.py --cohort headneck --work /work/bench_hn_finetune_long \
        --pretraining-from /work/bench_hn_finetune --epochs 40 --iterations-per-epoch 100 --curve-every 10

``--cohort phantoms`` is the earlier one-shot design below, on generated phantoms.

One nnU-Net dataset per cohort, planned by nnU-Net (3d_fullres) and shrunk to a CPU-sized network (--features,
--patch; the same plans for every run). Then, in one run of this script:

1. ``nnUNetTrainerAPEPretrain`` on the cohort's images except the evaluation cases (labels ignored), fold 0;
2. per number of labeled cases k (--shots, default 1 2 4): stock ``nnUNetTrainer`` trained on k labeled cases for
   the same iterations, seeds and data, once from scratch and once with ``-pretrained_weights`` from step 1;
3. nnU-Net's own validation of each on the same held-out cases (full images, no mirroring): Dice per organ.

Cohorts: ``headneck`` (../shared/data/Dataset901_HeadNeckCT; labeled cases are those that contour all 7 organs,
as uncontoured organs are label 0 there) and ``phantoms`` (generated; liver, spleen, kidneys, aorta).
Prints the machine, the settings, the seconds of each stage and a table; writes dice.png (Dice vs k).

    python benchmarks/bench_pretrain_finetune.py --cohort headneck [--pretrain-iterations 600] [--finetune-iterations 200]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import machine  # noqa: E402
from bench_trainers import _run, write_dataset  # noqa: E402

PHANTOM_PRETRAIN_ITERATIONS = 600
PHANTOM_ORGANS = {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4, "aorta": 5}

TRAINERS = '''
import os, random
import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunet_ape.nnunet.pretrain_trainer import nnUNetTrainerAPEPretrain


def _seed():
    seed = int(os.environ.get("BENCH_SEED", "0"))
    random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)


class nnUNetTrainerBenchAPEPretrain(nnUNetTrainerAPEPretrain):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _seed()
        self.num_iterations_per_epoch = 25
        self.num_epochs = max(1, int(os.environ["BENCH_PRETRAIN_ITERATIONS"]) // 25)
        self.num_val_iterations_per_epoch = 5
        self.initial_lr = float(os.environ.get("BENCH_PRETRAIN_LR", "1e-2"))


class _FineTune(nnUNetTrainer):
    """BENCH_FINETUNE_ITERATIONS iterations, validation on the held-out cases without mirroring."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _seed()
        self.num_iterations_per_epoch = 25
        self.num_epochs = max(1, int(os.environ["BENCH_FINETUNE_ITERATIONS"]) // 25)
        self.num_val_iterations_per_epoch = 2
        self.save_every = 10**6

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        out = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return out


class nnUNetTrainerBenchScratch(_FineTune):
    pass


class nnUNetTrainerBenchFromAPE(_FineTune):
    pass
'''


def phantom_dataset(raw: Path, n: int) -> tuple[str, list[str]]:
    """``n`` labeled phantoms as Dataset903_BenchPhantomsAPE; returns its name and all case names."""
    folder = raw / "Dataset903_BenchPhantomsAPE"
    seeds = list(range(300, 300 + n))
    if not (folder / "dataset.json").exists():
        write_dataset(folder, seeds, PHANTOM_ORGANS)
    return folder.name, [f"phantom{seed:03d}" for seed in seeds]


def shrink_plans(plans_file: Path, patch: list[int], features: list[int]) -> dict:
    """3d_fullres with a CPU-sized PlainConvUNet: ``len(features)`` stages, stride 2 after the first, ``patch``."""
    plans = json.loads(plans_file.read_text())
    config = plans["configurations"]["3d_fullres"]
    n = len(features)
    config.update({"patch_size": patch, "batch_size": 2})
    config["architecture"]["arch_kwargs"].update({
        "n_stages": n, "features_per_stage": features, "kernel_sizes": [[3, 3, 3]] * n,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1), "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1)})
    plans_file.write_text(json.dumps(plans, indent=1))
    return config


def dice_of(run: Path) -> dict[str, float]:
    """Per-organ Dice of nnU-Net's validation summary (foreground mean as ``mean``)."""
    summary = json.loads((run / "validation" / "summary.json").read_text())
    out = {k: v["Dice"] for k, v in summary["mean"].items()}
    out["mean"] = summary["foreground_mean"]["Dice"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", choices=("headneck", "phantoms"), default="headneck")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default /tmp/bench_pretrain_COHORT)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--evaluation-cases", type=int, default=8)
    parser.add_argument("--phantoms", type=int, default=24, help="phantom cohort size")
    parser.add_argument("--pretrain-iterations", type=int, default=PHANTOM_PRETRAIN_ITERATIONS,
                        help="APE pretraining iterations [phantoms: 600; headneck: 1000, fixed at the first start]")
    parser.add_argument("--finetune-iterations", type=int, default=200)
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64])
    parser.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="keep the work folder's planned data and pretraining")
    hn = parser.add_argument_group("--cohort headneck (resumable; see headneck_finetune)")
    hn.add_argument("--labeled", type=int, nargs="+", default=[2, 5, 10, 20], help="labeled training cases per run")
    hn.add_argument("--seeds", type=int, default=2, help="seeds for 5 or fewer labeled cases (one above)")
    hn.add_argument("--variants", nargs="+", default=["scratch", "ape", "ape_reinit", "ape_warmup", "channels"],
                    choices=("scratch", "ape", "ape_reinit", "ape_rescaled", "ape_matched", "ape_warmup", "channels"),
                    help="scratch, ape (init), ape_reinit (init, decoder end reset), ape_rescaled (ape_reinit with "
                         "every convolution that a norm follows scaled back to its initial weight norm), ape_matched "
                         "(ape_reinit with each such output channel scaled to a fresh network's output spread on a "
                         "training batch; neither in the default), ape_warmup (nnU-Net's fine-tuning "
                         "recipe: encoder init, lr 1e-3 with a linear warm-up), channels (the same pretraining minutes "
                         "as a standalone APE model whose embeddings are input channels)")
    hn.add_argument("--minutes", type=float, help="budget of this invocation (training stops cleanly at an epoch end)")
    hn.add_argument("--epochs", type=int, help="fine-tuning epochs, fixed at the first start [20]")
    hn.add_argument("--iterations-per-epoch", type=int, help="fine-tuning iterations per epoch, fixed at the first start [50]")
    hn.add_argument("--curve-every", type=int, help="epochs between learning-curve points (each costs about an epoch "
                    "on CPU), fixed at the first start [4]")
    hn.add_argument("--pretraining-from", type=Path, metavar="WORK", help="start a new --work from the finished data "
                    "preparation and APE pretraining of another work folder (copied), e.g. to try a longer fine-tuning "
                    "schedule without pretraining again")
    hn.add_argument("--test-cases", type=int, help="the first N test cases only (smoke checks)")
    hn.add_argument("--train-cases", type=int, help="the first N training cases only (smoke checks; a new --work)")
    hn.add_argument("--threads", type=int, help="torch threads [nnU-Net's]")
    hn.add_argument("--processes", type=int, default=1, help="nnU-Net preprocessing processes [1]")
    hn.add_argument("--compile", action="store_true", help="torch.compile the fine-tuned networks also on CPU, with "
                    "channels-last weights (nnU-Net 2.8 compiles only on CUDA; needs a C++ compiler; about a minute "
                    "of compiling per start)")
    hn.add_argument("--loader-processes", type=int, default=1, help="nnUNet_n_proc_DA [1]")
    hn.add_argument("--parallel", type=int, default=1, help="fine-tuning runs at once [1]; more only where there is room "
                    "(a GPU and many cores): seconds per epoch are then not comparable with a run alone")
    hn.add_argument("--report", action="store_true", help="only rewrite WORK/finetune/report.md and curves.png")
    hn.add_argument("--record", type=Path, metavar="DIR", help="at the end, copy the report's sources (settings, "
                    "training logs, test scores; no checkpoint) to DIR in WORK's layout, e.g. a folder of the "
                    "repository to commit: --report --work DIR rewrites the report from it if WORK is lost")
    args = parser.parse_args()
    if args.cohort == "headneck":
        import finetune_report
        import headneck_finetune

        args.work = args.work or Path("/work/bench_hn_finetune")
        if args.pretrain_iterations == PHANTOM_PRETRAIN_ITERATIONS:  # the phantom default: use the head-and-neck one
            args.pretrain_iterations = None
        if args.report:
            print(finetune_report.report(args.work))
        else:
            headneck_finetune.run(args)
        if args.record is not None:
            written = headneck_finetune.record(args.work, args.record)
            print(f"recorded {len(written)} files in {args.record}")
        return

    work = args.work or Path(f"/tmp/bench_pretrain_{args.cohort}")
    if work.exists() and not args.reuse:
        shutil.rmtree(work)
    roots = {k: work / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for p in roots.values():
        p.mkdir(parents=True, exist_ok=True)
    ext = work / "trainers"
    ext.mkdir(exist_ok=True)
    (ext / "bench_pretrain_trainers.py").write_text(TRAINERS)
    env = {**os.environ, **{k: str(v) for k, v in roots.items()}, "nnUNet_extTrainer": str(ext),
           "nnUNet_def_n_proc": str(os.cpu_count()), "nnUNet_n_proc_DA": str(max(1, (os.cpu_count() or 2))),
           "BENCH_PRETRAIN_ITERATIONS": str(args.pretrain_iterations),
           "BENCH_FINETUNE_ITERATIONS": str(args.finetune_iterations), "BENCH_SEED": str(args.seed)}
    print(f"machine: {machine()}")
    print(f"date: {time.strftime('%Y-%m-%d')}; cohort {args.cohort}; pretraining {args.pretrain_iterations} iterations; "
          f"fine-tuning {args.finetune_iterations} iterations per run; seed {args.seed}", flush=True)
    seconds = {}

    name, cases = phantom_dataset(roots["nnUNet_raw"], args.phantoms)
    labeled = list(cases)
    rng = np.random.default_rng(args.seed)
    labeled = [str(case) for case in rng.permutation(labeled)]
    evaluation = sorted(labeled[: args.evaluation_cases])
    pool = labeled[args.evaluation_cases :]
    if len(pool) < max(args.shots):
        raise SystemExit(f"only {len(pool)} labeled cases besides the {args.evaluation_cases} evaluation cases")
    shots = {k: sorted(pool[:k]) for k in args.shots}
    print(f"{len(cases)} cases; {len(labeled)} fully labeled; evaluation cases {evaluation}; shots {shots}", flush=True)

    dataset_id = name[len("Dataset"):len("Dataset") + 3]
    preprocessed = roots["nnUNet_preprocessed"] / name
    if not (preprocessed / "nnUNetPlans.json").exists():
        _, seconds["plan and preprocess"] = _run(env, "nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "3d_fullres",
                                                 "-np", str(os.cpu_count()))
        config = shrink_plans(preprocessed / "nnUNetPlans.json", args.patch, args.features)
    else:
        config = json.loads((preprocessed / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]
    print(f"3d_fullres spacing {config['spacing']} mm, patch {config['patch_size']}, features "
          f"{config['architecture']['arch_kwargs']['features_per_stage']}, batch {config['batch_size']}", flush=True)
    splits = [{"train": sorted(set(cases) - set(evaluation)), "val": evaluation}]
    splits += [{"train": shots[k], "val": evaluation} for k in args.shots]
    (preprocessed / "splits_final.json").write_text(json.dumps(splits, indent=1))

    results = roots["nnUNet_results"] / name
    pretrained = results / "nnUNetTrainerBenchAPEPretrain__nnUNetPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth"
    if not pretrained.exists():
        _, seconds["APE pretraining"] = _run(env, "nnUNetv2_train", dataset_id, "3d_fullres", "0", "-tr",
                                             "nnUNetTrainerBenchAPEPretrain", "-device", args.device)
    import torch

    log = torch.load(pretrained, map_location="cpu", weights_only=False)["logging"]
    print(f"APE pretraining loss: train {log['train_losses'][0]:.3f} -> {log['train_losses'][-1]:.3f}, "
          f"validation {log['val_losses'][0]:.3f} -> {log['val_losses'][-1]:.3f}", flush=True)

    r2 = position_r2_of(pretrained, [roots["nnUNet_raw"] / name / "imagesTr" / f"{case}_0000.nii.gz" for case in evaluation])
    print(f"R^2 of a linear fit embedding -> position over the body of the evaluation cases: pretrained "
          f"{r2['pretrained']:.3f}, same network untrained {r2['untrained']:.3f}", flush=True)

    table = {}
    for fold, k in enumerate(args.shots, start=1):
        for init, trainer, extra in (("scratch", "nnUNetTrainerBenchScratch", []),
                                     ("APE", "nnUNetTrainerBenchFromAPE", ["-pretrained_weights", str(pretrained)])):
            run = results / f"{trainer}__nnUNetPlans__3d_fullres" / f"fold_{fold}"
            if not (run / "validation" / "summary.json").exists():
                _, seconds[f"{k}-shot {init}"] = _run(env, "nnUNetv2_train", dataset_id, "3d_fullres", str(fold), "-tr", trainer,
                                                      "-device", args.device, *extra)
            table[(k, init)] = dice_of(run)
            print(f"  {k} labeled, {init}: mean Dice {table[(k, init)]['mean']:.3f}", flush=True)

    labels = json.loads((preprocessed / "dataset.json").read_text())["labels"]
    organs = {str(v): k for k, v in labels.items() if k != "background"}
    print("\nseconds:", ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print(f"\nDice on {len(evaluation)} held-out cases after {args.finetune_iterations} fine-tuning iterations:")
    print("| labeled cases | init | mean | " + " | ".join(organs.values()) + " |")
    print("|---|---|---|" + "---|" * len(organs))
    for (k, init), dice in table.items():
        print(f"| {k} | {init} | {dice['mean']:.3f} | " + " | ".join(f"{dice.get(o, float('nan')):.3f}" for o in organs) + " |")
    plot(table, args.shots, work / "dice.png", f"{args.cohort}: {args.finetune_iterations} fine-tuning iterations")
    print(f"\nplot: {work / 'dice.png'}")


def position_r2_of(checkpoint: Path, images: list[Path]) -> dict[str, float]:
    """Mean R^2 (:func:`nnunet_ape.position_fit.position_r2` over each CT's body) of the pretrained checkpoint's maps
    and of the same network freshly initialised, on ``images``."""
    import torch

    from nnunet_ape.checkpoint import load_ape_model
    from nnunet_ape.embed import embed_volume, stored_settings
    from nnunet_ape.io import read_volume
    from nnunet_ape.nnunet.unlabeled_dataset import body_label
    from nnunet_ape.position_fit import position_r2

    model, state = load_ape_model(checkpoint)
    untrained, _ = load_ape_model(checkpoint)
    torch.manual_seed(0)
    for module in untrained.network.modules():
        if hasattr(module, "reset_parameters") and module is not untrained.network:
            module.reset_parameters()
    untrained.output_mean.zero_()
    untrained.output_std.fill_(1.0)
    scores = {"pretrained": [], "untrained": []}
    for image in images:
        ct = read_volume(image)
        body = body_label(ct).array.astype(bool)
        for key, net in (("pretrained", model), ("untrained", untrained)):
            scores[key].append(position_r2(embed_volume(net, ct, stored_settings(state), progress=False), body))
    return {k: float(np.mean(v)) for k, v in scores.items()}


def plot(table: dict, shots: list[int], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for init in ("scratch", "APE"):
        ax.plot(shots, [table[(k, init)]["mean"] for k in shots], marker="o", label=f"{init} init")
    ax.set_xlabel("labeled training cases")
    ax.set_ylabel("mean Dice (held-out)")
    ax.set_xticks(shots)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main()
