"""Benchmark: nnUNetTrainerAPECrop and nnUNetTrainerAPEChannels against stock nnUNetTrainer, same data, same run.

A phantom cohort (liver and left kidney labeled) becomes an nnU-Net raw dataset; nnU-Net fingerprints and plans it
(3d_fullres, its own planner and network); `nnunet-ape plan` adds a liver-crop, a kidney-crop and an APE-channels
configuration (a 3-shot localizer on training phantoms) and `nnunet-ape preprocess` writes their data. Then each
configuration trains for the same number of iterations with its trainer, and the script prints, per configuration:
patch and batch size as planned, seconds per training step (forward + backward, data loading excluded) and per
iteration (with data loading), peak memory of the training process, and the validation Dice of liver and kidney on
the full held-out images (nnU-Net's own validation; crop models predict on the localizer's box and are pasted back).
On a CPU, nnU-Net's planned networks train a few iterations per minute: the Dice columns then say how far a very
short training got, not what the methods reach.

    python benchmarks/bench_trainers.py [--model APE.pt] [--iterations 20] [--work /tmp/bench_trainers]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import machine  # noqa: E402

DATASET = "Dataset950_BenchPhantoms"
ORGANS = {"liver": 1, "kidney_left": 2}

BENCH_TRAINERS = '''
import json, os, resource, time
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunet_ape.nnunet.trainers import nnUNetTrainerAPEChannels, nnUNetTrainerAPECrop

ITERATIONS = int(os.environ["BENCH_ITERATIONS"])


class _Timed:
    """N training iterations, 1 validation iteration, no test-time mirroring; times each train step."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, ITERATIONS, 1
        self.step_seconds = []

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        out = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return out

    def train_step(self, batch):
        began = time.perf_counter()
        out = super().train_step(batch)
        self.step_seconds.append(time.perf_counter() - began)
        return out

    def on_train_epoch_start(self):
        self.epoch_began = time.perf_counter()
        super().on_train_epoch_start()

    def on_train_epoch_end(self, outputs):
        self.epoch_seconds = time.perf_counter() - self.epoch_began
        super().on_train_epoch_end(outputs)

    def on_train_end(self):
        gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        timing = {"step_seconds": self.step_seconds, "epoch_seconds": self.epoch_seconds,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak_gpu_gib": gpu,
                  "patch_size": list(self.configuration_manager.patch_size), "batch_size": self.batch_size}
        with open(os.path.join(self.output_folder, "bench_timing.json"), "w") as f:
            json.dump(timing, f)
        super().on_train_end()


class nnUNetTrainerBenchStock(_Timed, nnUNetTrainer):
    pass


class nnUNetTrainerAPECropBench(_Timed, nnUNetTrainerAPECrop):
    pass


class nnUNetTrainerAPEChannelsBench(_Timed, nnUNetTrainerAPEChannels):
    pass
'''


def _run(env: dict, *args: str) -> tuple[str, float]:
    """Run the venv's command ``args`` with ``env``; prints and returns its seconds (with its stdout); stops on failure."""
    began = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / args[0]), *args[1:]], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    print(f"  {' '.join(args[:6])}: {seconds:.0f} s", flush=True)
    if done.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout, seconds


def write_dataset(raw: Path, seeds: list[int], organs: dict[str, int] = ORGANS) -> None:
    """Phantoms as an nnU-Net raw dataset with labels ``organs`` (default liver 1, kidney_left 2)."""
    import SimpleITK as sitk

    from nnunet_ape.phantoms import ORGAN_LABELS, make_phantom

    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        ct, seg = make_phantom(seed)
        array = sitk.GetArrayFromImage(seg)
        out = np.zeros(array.shape, np.uint8)
        for organ, value in organs.items():
            out[array == ORGAN_LABELS[organ]] = value
        label = sitk.GetImageFromArray(out)
        label.CopyInformation(seg)
        sitk.WriteImage(ct, str(raw / "imagesTr" / f"phantom{seed:03d}_0000.nii.gz"), useCompression=True)
        sitk.WriteImage(label, str(raw / "labelsTr" / f"phantom{seed:03d}.nii.gz"), useCompression=True)
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, **organs},
                                                  "numTraining": len(seeds), "file_ending": ".nii.gz"}))


def pretrain(work: Path, images: list[Path], iterations: int) -> Path:
    """A tiny APE model on ``images`` (coarse views, as the demo); returns its checkpoint."""
    from nnunet_ape.pretrain.batches import BatchConfig
    from nnunet_ape.pretrain.train_ape import COARSE_SPACING_RANGE, PretrainConfig, pretrain_ape

    cfg = PretrainConfig(iterations=iterations, lr=2e-3, lr_schedule="cosine", model="tiny", device="cpu", workers=1,
                         batch=BatchConfig(variant="naive", pairs=4, voxels=1024, patch_volume=300_000,
                                           spacing_range=COARSE_SPACING_RANGE))
    pretrain_ape(images, work / "ape", cfg)
    return work / "ape" / "checkpoint_final.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="APE checkpoint (default: pretrain a tiny one on the training phantoms)")
    parser.add_argument("--pretrain-iterations", type=int, default=600)
    parser.add_argument("--phantoms", type=int, default=8, help="training phantoms (3 more are validation)")
    parser.add_argument("--iterations", type=int, default=20, help="training iterations per configuration")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_trainers"))
    parser.add_argument("--reuse", action="store_true", help="reuse the dataset, model and preprocessed data of an earlier run in --work")
    parser.add_argument("--loader-processes", type=int, default=1, help="nnUNet_n_proc_DA (data-loading worker processes)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    reuse = args.reuse and (args.work / "preprocess_seconds.json").is_file()
    if args.work.exists() and not reuse:
        shutil.rmtree(args.work)
    roots = {k: args.work / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    shutil.rmtree(roots["nnUNet_results"], ignore_errors=True)
    for p in roots.values():
        p.mkdir(parents=True, exist_ok=True)
    (args.work / "ext").mkdir(exist_ok=True)
    (args.work / "ext" / "bench_trainers.py").write_text(BENCH_TRAINERS)
    env = {**os.environ, **{k: str(v) for k, v in roots.items()}, "nnUNet_extTrainer": str(args.work / "ext"),
           "BENCH_ITERATIONS": str(args.iterations), "nnUNet_def_n_proc": str(os.cpu_count()),
           "nnUNet_n_proc_DA": str(args.loader_processes)}
    train, val = list(range(100, 100 + args.phantoms)), list(range(200, 203))
    configurations = {"3d_fullres": "nnUNetTrainerBenchStock", "3d_fullres_ape_liver": "nnUNetTrainerAPECropBench",
                      "3d_fullres_ape_kidney_left": "nnUNetTrainerAPECropBench", "3d_fullres_ape": "nnUNetTrainerAPEChannelsBench"}
    if reuse:
        print(f"reusing the preprocessed data in {args.work}")
        preprocess = json.loads((args.work / "preprocess_seconds.json").read_text())
    else:
        preprocess = prepare(args, env, roots, train, val, list(configurations)[1:])
    train_and_report(args, env, roots, configurations, preprocess, len(val))


def prepare(args, env: dict, roots: dict, train: list[int], val: list[int], ape_configurations: list[str]) -> dict:
    """Dataset, APE model, localizer, nnU-Net plans and preprocessed data of every configuration; returns the
    seconds `nnunet-ape preprocess` took per APE configuration."""
    from nnunet_ape.cases import cases_from_nnunet
    from nnunet_ape.localize.fit import fit_localizer
    from nnunet_ape.localize.localizer import save_localizer

    write_dataset(roots["nnUNet_raw"] / DATASET, train + val)
    images = sorted((roots["nnUNet_raw"] / DATASET / "imagesTr").glob("*_0000.nii.gz"))
    model = args.model or pretrain(args.work, [p for p in images if int(p.name[7:10]) in train], args.pretrain_iterations)
    shots = [c for c in cases_from_nnunet(str(roots["nnUNet_raw"] / DATASET)) if int(c.name[7:10]) in train[:3]]
    localizer = save_localizer(fit_localizer(shots, ORGANS, model), args.work / "localizer.json")

    print("nnU-Net planning and preprocessing:")
    _run(env, "nnUNetv2_plan_and_preprocess", "-d", "950", "-c", "3d_fullres", "-np", str(os.cpu_count()))
    preprocessed = roots["nnUNet_preprocessed"] / DATASET
    (preprocessed / "splits_final.json").write_text(json.dumps([{"train": [f"phantom{s:03d}" for s in train],
                                                                  "val": [f"phantom{s:03d}" for s in val]}]))
    _run(env, "nnunet-ape", "plan", "-d", "950", "-l", str(localizer), "--organs", *ORGANS)
    _run(env, "nnunet-ape", "plan", "-d", "950", "-m", str(model), "--channels", "ape")
    preprocess = {}
    for name in ape_configurations:
        began = time.perf_counter()
        _run(env, "nnunet-ape", "preprocess", "-d", "950", "-c", name, "-np", str(os.cpu_count()), "--device", args.device)
        preprocess[name] = time.perf_counter() - began
    (args.work / "preprocess_seconds.json").write_text(json.dumps(preprocess))
    return preprocess


def train_and_report(args, env: dict, roots: dict, configurations: dict, preprocess: dict, n_val: int) -> None:
    """Train every configuration for ``args.iterations`` iterations and print the table."""
    print(f"training, {args.iterations} iterations each:")
    rows = []
    for name, trainer in configurations.items():
        _run(env, "nnUNetv2_train", "950", name, "0", "-tr", trainer, "-device", args.device)
        run = roots["nnUNet_results"] / DATASET / f"{trainer}__nnUNetPlans__{name}" / "fold_0"
        timing = json.loads((run / "bench_timing.json").read_text())
        dice = json.loads((run / "validation" / "summary.json").read_text())["mean"]
        organ_dice = {o: dice[str(v)]["Dice"] for o, v in ORGANS.items() if str(v) in dice}
        if name.startswith("3d_fullres_ape_"):  # crop configurations score their own organ
            organ_dice = {o: d for o, d in organ_dice.items() if name.endswith(o)}
        rows.append((name, trainer, timing, organ_dice))
    stock_step = float(np.median(rows[0][2]["step_seconds"][1:] or rows[0][2]["step_seconds"]))
    print(f"\n{args.phantoms} training and {n_val} validation phantoms, {args.iterations} training iterations per "
          f"configuration, device {args.device}\n")
    print("| configuration | trainer | patch | batch | s / train step | x stock | s / iteration | peak RSS GiB | liver Dice | kidney_left Dice | preprocess s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, trainer, timing, organ_dice in rows:
        step = float(np.median(timing["step_seconds"][1:] or timing["step_seconds"]))
        cells = [name, trainer.replace("Bench", ""), "x".join(map(str, timing["patch_size"])), timing["batch_size"],
                 f"{step:.2f}", f"{stock_step / step:.1f}", f"{timing['epoch_seconds'] / args.iterations:.2f}",
                 f"{timing['peak_rss_gib']:.2f}", f"{organ_dice.get('liver', float('nan')):.3f}" if "liver" in organ_dice else "-",
                 f"{organ_dice.get('kidney_left', float('nan')):.3f}" if "kidney_left" in organ_dice else "-",
                 f"{preprocess[name]:.0f}" if name in preprocess else "-"]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
