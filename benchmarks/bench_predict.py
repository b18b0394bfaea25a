"""Benchmark: `nnunet-ape predict` (APE + crop + nnU-Net on the crop + paste back) against full-image nnU-Net.

One run, one machine. A phantom cohort (liver, spleen, both kidneys labeled) becomes an nnU-Net raw dataset; nnU-Net
plans it (3d_fullres); `nnunet-ape plan` adds one crop configuration per organ (a localizer fit on the labeled training
phantoms, ``--shots``, with a tiny APE model pretrained on them) and `nnunet-ape preprocess` writes their data. Every configuration gets
the *same* network architecture and patch size (``--architecture small``: a reduced U-Net that trains and predicts in
minutes on a CPU; ``planned``: nnU-Net's planned 3d_fullres network) and trains for the same number of iterations.

Then, on a 512x512x300 CT (a validation phantom resampled onto a grid of that size over its field of view) and on
the real abdominal CT of ../shared/data (patient A), each run in its own process, without TTA:

- full: `nnunet-ape predict -c 3d_fullres` with the stock model (plain nnU-Net prediction of the whole image);
- kidney, liver: one crop model; 4 organs: the four crop models at once (one APE pass).

It prints seconds per stage (localization = APE map + boxes; nnU-Net per model; the whole case), the ratio to the
full-image prediction, peak memory of the process, and the validation Dice (nnU-Net's own validation on the
held-out phantoms, crop models pasted back into the full images) after the training iterations.

    python benchmarks/bench_predict.py [--iterations 250] [--architecture small] [--work /tmp/bench_predict] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import DATA, machine  # noqa: E402
from bench_trainers import _run, pretrain, write_dataset  # noqa: E402

DATASET_ID = 951
DATASET = f"Dataset{DATASET_ID}_BenchPredict"
ORGANS = {"liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4}
REAL_CT = DATA / "ts_a_abdomen_pelvis_ct.nii.gz"

TRAINERS = '''
import os
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunet_ape.nnunet.trainers import nnUNetTrainerAPECrop

ITERATIONS = int(os.environ["BENCH_ITERATIONS"])


class _Short:
    """BENCH_ITERATIONS training iterations, one validation iteration, validation without mirroring."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, ITERATIONS, 1

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        out = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return out


class nnUNetTrainerPredictBenchStock(_Short, nnUNetTrainer):
    pass


class nnUNetTrainerPredictBenchCrop(_Short, nnUNetTrainerAPECrop):
    pass
'''

MEASURE = '''
import resource, sys, time
from nnunet_ape.cli.main import main
began = time.perf_counter()
code = main(sys.argv[1:])
print(f"BENCH wall_s={time.perf_counter() - began:.3f} peak_rss_gib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.3f}")
sys.exit(code)
'''

SMALL = {"n_stages": 4, "features_per_stage": [16, 32, 64, 128], "kernel_sizes": [[3, 3, 3]] * 4,
         "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage": [2, 2, 2, 2],
         "n_conv_per_stage_decoder": [2, 2, 2]}


def same_architecture(plans_file: Path, configurations: list[str], architecture: str) -> tuple[list[int], dict]:
    """Give every configuration the architecture and patch size of 3d_fullres (``small``: the reduced network, patch
    64^3, batch 2); returns the patch size and architecture kwargs used."""
    plans = json.loads(plans_file.read_text())
    base = plans["configurations"]["3d_fullres"]
    if architecture == "small":
        base["architecture"]["arch_kwargs"].update(SMALL)
        base.update({"patch_size": [64, 64, 64], "batch_size": 2})
    for name in configurations:
        config = plans["configurations"][name]
        config.update({"patch_size": base["patch_size"], "batch_size": base["batch_size"],
                       "architecture": json.loads(json.dumps(base["architecture"]))})
    plans_file.write_text(json.dumps(plans, indent=1))
    return base["patch_size"], base["architecture"]["arch_kwargs"]


def large_phantom(path: Path, seed: int) -> None:
    """Phantom ``seed`` resampled onto a 512x512x300 grid over its own field of view (linear, int16 HU)."""
    import SimpleITK as sitk

    from nnunet_ape.phantoms import make_phantom

    ct, _ = make_phantom(seed)
    size = (512, 512, 300)
    extent = [n * s for n, s in zip(ct.GetSize(), ct.GetSpacing())]
    spacing = [e / n for e, n in zip(extent, size)]
    out = sitk.Resample(ct, size, sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), spacing, ct.GetDirection(), -1000, sitk.sitkInt16)
    sitk.WriteImage(out, str(path), useCompression=True)


def prepare(args, env: dict, roots: dict, train: list[int], val: list[int]) -> dict:
    """Dataset, APE model, localizer, plans, preprocessed data and trained models of every configuration."""
    from nnunet_ape.cases import cases_from_nnunet
    from nnunet_ape.localize.fit import fit_localizer
    from nnunet_ape.localize.localizer import save_localizer

    raw = roots["nnUNet_raw"] / DATASET
    write_dataset(raw, train + val, ORGANS)
    images = sorted((raw / "imagesTr").glob("*_0000.nii.gz"))
    model = args.model or pretrain(args.work, [p for p in images if int(p.name[7:10]) in train], args.pretrain_iterations)
    shots = [c for c in cases_from_nnunet(str(raw)) if int(c.name[7:10]) in train[:args.shots]]
    fitted = fit_localizer(shots, ORGANS, model)
    localizer = save_localizer(fitted, args.work / "localizer.json")
    methods = {o: e["method"] for o, e in fitted["organs"].items()}
    print(f"localizer from {len(shots)} shots, method per organ: {methods}")
    print("nnU-Net planning and preprocessing:")
    _run(env, "nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", str(os.cpu_count()))
    preprocessed = roots["nnUNet_preprocessed"] / DATASET
    (preprocessed / "splits_final.json").write_text(json.dumps([{"train": [f"phantom{s:03d}" for s in train],
                                                                  "val": [f"phantom{s:03d}" for s in val]}]))
    _run(env, "nnunet-ape", "plan", "-d", str(DATASET_ID), "-l", str(localizer), "--organs", *args.crops)
    crops = [f"3d_fullres_ape_{o}" for o in args.crops]
    _run(env, "nnunet-ape", "preprocess", "-d", str(DATASET_ID), "-c", *crops, "-np", str(os.cpu_count()), "--device", args.device)
    patch, arch = same_architecture(preprocessed / "nnUNetPlans.json", crops, args.architecture)
    print(f"training, {args.iterations} iterations each, patch {patch}, features {arch['features_per_stage']}:")
    trainers = {"3d_fullres": "nnUNetTrainerPredictBenchStock", **{name: "nnUNetTrainerPredictBenchCrop" for name in crops}}
    train_seconds = {}
    for name, trainer in trainers.items():
        _, seconds = _run(env, "nnUNetv2_train", str(DATASET_ID), name, "0", "-tr", trainer, "-device", args.device)
        train_seconds[name] = round(seconds, 1)
    dice = {}
    for name, trainer in trainers.items():
        summary = json.loads((roots["nnUNet_results"] / DATASET / f"{trainer}__nnUNetPlans__{name}" / "fold_0" / "validation" / "summary.json").read_text())
        dice[name] = {o: summary["mean"][str(v)]["Dice"] for o, v in ORGANS.items() if str(v) in summary["mean"]}
    info = {"dice": dice, "patch": patch, "features": arch["features_per_stage"], "iterations": args.iterations,
            "train_seconds": train_seconds, "methods": methods, "shots": len(shots)}
    (args.work / "prepared.json").write_text(json.dumps(info))
    return info


def measure(env: dict, work: Path, image: Path, label: str, configurations: list[str], device: str) -> dict:
    """One `nnunet-ape predict` run in its own process; stage seconds from CASE_boxes.json, wall and peak RSS."""
    out = work / "predictions" / f"{image.name.split('.')[0]}_{label}"
    shutil.rmtree(out, ignore_errors=True)
    done = subprocess.run([sys.executable, "-c", MEASURE, "predict", "-i", str(image), "-o", str(out), "-d", str(DATASET_ID),
                           "-c", *configurations, "--disable_tta", "-device", device], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"predict failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    stats = dict(kv.split("=") for kv in done.stdout.strip().splitlines()[-1].split()[1:])
    report = json.loads(next(out.glob("*_boxes.json")).read_text())
    seconds = report["seconds"]
    nnunet = sum(v for k, v in seconds.items() if k not in ("localize", "case"))
    voxels = [m.get("voxel_ratio", 1.0) for m in report["models"]]
    regrown = sum(m.get("regrown", 0) for m in report["models"])
    return {"label": label, "localize": seconds.get("localize", 0.0), "nnunet": nnunet, "case": seconds["case"],
            "wall": float(stats["wall_s"]), "peak_rss_gib": float(stats["peak_rss_gib"]), "voxel_ratio": voxels, "regrown": regrown}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="APE checkpoint (default: pretrain a tiny one on the training phantoms)")
    parser.add_argument("--pretrain-iterations", type=int, default=2000)
    parser.add_argument("--phantoms", type=int, default=8, help="training phantoms")
    parser.add_argument("--validation", type=int, default=3, help="validation phantoms (nnU-Net's validation Dice)")
    parser.add_argument("--crops", nargs="+", choices=list(ORGANS), default=list(ORGANS),
                        help="organs that get a crop model (the full-image model always learns all four)")
    parser.add_argument("--shots", type=int, default=8, help="labeled training phantoms the localizer is fit on")
    parser.add_argument("--iterations", type=int, default=250, help="training iterations per configuration")
    parser.add_argument("--architecture", choices=("small", "planned"), default="small",
                        help="small: a reduced U-Net for CPU runs; planned: nnU-Net's planned 3d_fullres network (needs a GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_predict"))
    parser.add_argument("--reuse", action="store_true", help="reuse the dataset and trained models of an earlier run in --work")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    reuse = args.reuse and (args.work / "prepared.json").is_file()
    if args.work.exists() and not reuse:
        shutil.rmtree(args.work)
    roots = {k: args.work / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for p in roots.values():
        p.mkdir(parents=True, exist_ok=True)
    (args.work / "ext").mkdir(exist_ok=True)
    (args.work / "ext" / "bench_predict_trainers.py").write_text(TRAINERS)
    env = {**os.environ, **{k: str(v) for k, v in roots.items()}, "nnUNet_extTrainer": str(args.work / "ext"),
           "BENCH_ITERATIONS": str(args.iterations), "nnUNet_def_n_proc": str(os.cpu_count()), "nnUNet_n_proc_DA": "1"}
    train, val = list(range(100, 100 + args.phantoms)), list(range(200, 200 + args.validation))
    info = json.loads((args.work / "prepared.json").read_text()) if reuse else prepare(args, env, roots, train, val)
    large = args.work / "phantom200_512x512x300.nii.gz"
    if not large.is_file():
        large_phantom(large, val[0])
    runs = {"full image (stock nnU-Net)": ["3d_fullres"]}
    runs.update({f"{o} crop": [f"3d_fullres_ape_{o}"] for o in ("kidney_left", "liver") if o in args.crops})
    if len(args.crops) > 1:
        runs[f"{len(args.crops)} organs ({len(args.crops)} crop models)"] = [f"3d_fullres_ape_{o}" for o in args.crops]
    print("prediction, no TTA, each in its own process:")
    for image in (large, REAL_CT):
        rows = []
        for label, configurations in runs.items():
            rows.append(measure(env, args.work, image, label, configurations, args.device))
            print(f"  {image.name} {label}: {rows[-1]['case']:.1f} s", flush=True)
        full = rows[0]
        print(f"\n{image.name}\n")
        print("| run | localize s | nnU-Net s | case s | x full | localize % of full nnU-Net | voxels full/crop | regrown | peak RSS GiB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            ratio = ", ".join(f"{v:.1f}" for v in r["voxel_ratio"])
            print(f"| {r['label']} | {r['localize']:.2f} | {r['nnunet']:.2f} | {r['case']:.2f} | {full['case'] / r['case']:.1f} | "
                  f"{100 * r['localize'] / full['nnunet']:.1f} | {ratio} | {r['regrown']} | {r['peak_rss_gib']:.2f} |")
    print(f"\nvalidation Dice after {info['iterations']} training iterations ({args.phantoms} training, {len(val)} validation "
          f"phantoms, patch {info['patch']}, features {info['features']}):\n")
    print("| model | " + " | ".join(ORGANS) + " |")
    print("|---|" + "---|" * len(ORGANS))
    for name, dice in info["dice"].items():
        print(f"| {name} | " + " | ".join(f"{dice[o]:.3f}" if o in dice else "-" for o in ORGANS) + " |")
    print(f"\ntraining seconds per model: {info.get('train_seconds')}; localizer ({info.get('shots')} shots): {info.get('methods')}")


if __name__ == "__main__":
    main()
