"""The first run on a CUDA machine: every GPU-facing path of the plugin once, timed, in about 10 minutes.

Run through ``benchmarks/gpu_check.sh`` (it refuses to start without a CUDA GPU, with one line). Steps, each a
command of the installed tools as a user runs it, its output in ``WORK/logs/NN_step.log``:

 1. a phantom nnU-Net raw dataset (liver 1, kidney_left 2);
 2. ``nnunet-ape pretrain ape`` with AMP (on by default on CUDA) for a few hundred iterations;
 3. ``nnunet-ape localize fit`` on 3 shots; nnU-Net's fingerprint, plans and preprocessing (``3d_fullres``);
 4. ``nnunet-ape plan`` (a liver crop, APE channels) and ``nnunet-ape preprocess`` on the GPU;
 5. ``nnUNetTrainerAPECrop_smoke`` and ``nnUNetTrainerAPEChannels_smoke`` (5 iterations + validation) with
    ``torch.compile`` off and on (``nnUNet_compile=0`` / ``1``; nnU-Net compiles by default on CUDA);
 6. ``nnUNetTrainerAPEPretrain_smoke`` on one GPU (its checkpoint then read as nnU-Net main's nnssl fine-tuning
    reads it: every network weight must load onto the CPU), and with ``-num_gpus 2`` where there are 2 GPUs;
 7. a 512x512x300 CT (a phantom resampled onto that grid), a stock ``3d_fullres`` model (random weights: time and
    memory do not depend on them), ``nnUNetv2_predict`` against ``nnunet-ape predict`` with the same model (label
    maps compared), and ``nnunet-ape predict`` with the liver crop model.

Per step: seconds, peak GPU memory (nvidia-smi polled every 0.2 s, all GPUs summed, less what was in use before
the step) and the step's peak RSS; a table at the end. The first failing step stops the run with a non-zero exit
code, naming the step and its log. ``--dry-run`` prints the steps' commands and runs nothing; ``--device cpu
--tiny`` runs the same steps at toy size on the CPU (nnU-Net turns compile off on CPU and has no multi-GPU there:
those steps say so), which ``tests/test_gpu_check.py`` runs.

    benchmarks/gpu_check.sh [WORK] [--dry-run] [--device cpu --tiny] [--steps N ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATASET_ID = "960"
DATASET = "Dataset960_GpuCheck"
PRETRAIN_SMOKE = "nnUNetTrainerAPEPretrain_smoke"  # step 6's trainer; the checkpoint check reads its results folder
ORGANS = {"liver": 1, "kidney_left": 2}
TRAIN, VAL = [100, 101, 102, 103, 104, 105], [200, 201]
TINY_TRAIN, TINY_VAL = [100, 101, 102], [200]


@dataclass
class Step:
    name: str
    command: list[str]
    env: dict | None = None  # extra environment of this step
    skip: str | None = None  # why it does not run here


def helper(*args: str) -> list[str]:
    """A command of this file's helper functions (``python gpu_check.py --helper NAME ARGS``)."""
    return [sys.executable, str(Path(__file__).resolve()), "--helper", *args]


def tool(name: str) -> str:
    """A console script of this Python environment (``nnunet-ape``, ``nnUNetv2_*``)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def steps(work: Path, device: str, tiny: bool, gpus: int) -> list[Step]:
    raw = work / "nnUNet_raw" / DATASET
    ape = work / "ape"
    ct512 = work / "ct512"
    on_cpu = device == "cpu"
    pretrain = ["--iterations", "10", "--model", "tiny", "--workers", "1", "--pairs", "2", "--voxels", "512",
                "--patch-volume", "100000", "--spacing", "coarse", "--lr", "2e-3"] if tiny else \
        ["--iterations", "300", "--workers", "4", "--lr-schedule", "cosine", "--max-minutes", "3"]
    np_ = "2" if tiny else "8"
    out = [
        Step("dataset", helper("dataset", str(raw), str(tiny))),
        Step("pretrain ape (AMP)" if not on_cpu else "pretrain ape", [tool("nnunet-ape"), "pretrain", "ape", "-i", str(raw / "imagesTr"), "-o", str(ape),
                                                             "--device", device, "--checkpoint-every", "100", *pretrain]),
        Step("localize fit", [tool("nnunet-ape"), "localize", "fit", "-m", str(ape / "checkpoint_final.pt"), "-d", str(raw),
                              "--organs", *ORGANS, "--shots", "3", "-o", str(work / "localizer.json"), "--device", device]),
        Step("nnU-Net plan and preprocess", [tool("nnUNetv2_plan_and_preprocess"), "-d", DATASET_ID, "-c", "3d_fullres", "-np", np_]),
        Step("splits", helper("splits", str(work), str(tiny))),
        Step("nnunet-ape plan (crop)", [tool("nnunet-ape"), "plan", "-d", DATASET_ID, "-l", str(work / "localizer.json"), "--organs", "liver"]),
        Step("nnunet-ape plan (channels)", [tool("nnunet-ape"), "plan", "-d", DATASET_ID, "-m", str(ape / "checkpoint_final.pt"),
                                            "--channels", "ape"]),
        Step("nnunet-ape preprocess", [tool("nnunet-ape"), "preprocess", "-d", DATASET_ID, "-c", "3d_fullres_ape_liver", "3d_fullres_ape",
                                       "-np", "2", "--device", device]),
    ]
    if tiny:
        out.append(Step("tiny plans", helper("tiny-plans", str(work))))
    for trainer, configuration in (("nnUNetTrainerAPECrop_smoke", "3d_fullres_ape_liver"), ("nnUNetTrainerAPEChannels_smoke", "3d_fullres_ape")):
        for compiled in ("0", "1"):
            out.append(Step(f"{trainer} compile {'on' if compiled == '1' else 'off'}",
                            [tool("nnUNetv2_train"), DATASET_ID, configuration, "0", "-tr", trainer, "-device", device],
                            {"nnUNet_compile": compiled},
                            "nnU-Net turns torch.compile off on CPU: the same as compile off" if on_cpu and compiled == "1" else None))
    pretrain_trainer = [tool("nnUNetv2_train"), DATASET_ID, "3d_fullres", "all", "-tr", PRETRAIN_SMOKE, "-device", device]
    out.append(Step("nnUNetTrainerAPEPretrain_smoke, 1 GPU" if not on_cpu else "nnUNetTrainerAPEPretrain_smoke", pretrain_trainer))
    out.append(Step("pretraining checkpoint loads without a GPU", helper("portable-checkpoint", str(work))))
    out.append(Step("nnUNetTrainerAPEPretrain_smoke, 2 GPUs", [*pretrain_trainer, "-num_gpus", "2"],
                    skip="no CUDA: nnU-Net's multi-GPU training needs CUDA devices" if on_cpu else
                    (f"{gpus} GPU(s) here" if gpus < 2 else None)))
    predict_common = ["-d", DATASET_ID, "-c", "3d_fullres", "-tr", "nnUNetTrainer", "-f", "0", "-device", device, "--disable_tta"]
    out += [
        Step("512x512x300 CT" if not tiny else "toy CT", helper("ct", str(ct512), str(tiny))),
        Step("stock model", helper("stock-model", str(work))),
        Step("nnUNetv2_predict (stock)", [tool("nnUNetv2_predict"), "-i", str(ct512), "-o", str(work / "pred_nnunet"), *predict_common,
                                          "-npp", "1" if tiny else "3", "-nps", "1" if tiny else "3"]),
        Step("nnunet-ape predict (stock model)", [tool("nnunet-ape"), "predict", "-i", str(ct512), "-o", str(work / "pred_ape_stock"),
                                                  *predict_common]),
        Step("compare label maps", helper("compare", str(work / "pred_nnunet"), str(work / "pred_ape_stock"))),
        Step("nnunet-ape predict (liver crop)", [tool("nnunet-ape"), "predict", "-i", str(ct512), "-o", str(work / "pred_ape_crop"),
                                                 "-d", DATASET_ID, "-c", "3d_fullres_ape_liver", "-tr", "nnUNetTrainerAPECrop_smoke",
                                                 "-f", "0", "-device", device, "--disable_tta"]),
    ]
    return out


def environment(work: Path, tiny: bool = False) -> dict:
    roots = {k: str(work / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    if tiny:  # nnU-Net's default of 8 export / data-loading processes swamps a small CPU machine
        roots.update({"nnUNet_def_n_proc": "2", "nnUNet_n_proc_DA": "2"})
    paths = [str(REPO), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO))]
    return {**roots, "nnUNet_extTrainer": str(REPO / "trainers"), "PYTHONPATH": os.pathsep.join(paths)}


class GpuMemory:
    """Peak of nvidia-smi's used memory (MiB, summed over GPUs) while running, polled every 0.2 s."""

    def __init__(self) -> None:
        self.available = shutil.which("nvidia-smi") is not None
        self.peak = self.baseline = 0.0
        self._stop = threading.Event()

    def used(self) -> float:
        done = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True)
        return sum(float(v) for v in done.stdout.split()) if done.returncode == 0 else 0.0

    def __enter__(self):
        if self.available:
            self.baseline = self.peak = self.used()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.used())

    def __exit__(self, *exc) -> None:
        if self.available:
            self._stop.set()
            self._thread.join()

    @property
    def gib(self) -> float | None:
        return (self.peak - self.baseline) / 1024 if self.available else None


def run_step(index: int, step: Step, env: dict, logs: Path) -> dict:
    log = logs / f"{index:02d}_{''.join(c if c.isalnum() else '_' for c in step.name)[:60]}.log"
    began = time.perf_counter()
    with GpuMemory() as memory, open(log, "w") as f:
        f.write(f"$ {shlex.join(step.command)}\n")
        f.flush()
        process = subprocess.Popen(step.command, env={**os.environ, **env, **(step.env or {})}, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    return {"step": step.name, "seconds": time.perf_counter() - began, "gpu_gib": memory.gib,
            "rss_gib": usage.ru_maxrss / 2**20, "rc": process.returncode, "log": str(log)}


def table(rows: list[dict]) -> str:
    lines = ["| # | step | s | peak GPU GiB | peak RSS GiB | result |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        gpu = "-" if r.get("gpu_gib") is None else f"{r['gpu_gib']:.2f}"
        seconds = "-" if r.get("seconds") is None else f"{r['seconds']:.1f}"
        rss = "-" if r.get("rss_gib") is None else f"{r['rss_gib']:.2f}"
        lines.append(f"| {i} | {r['step']} | {seconds} | {gpu} | {rss} | {r['result']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", nargs="?", type=Path, default=Path("/tmp/nnunet_ape_gpu_check"), help="work folder (emptied first)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a CPU check of the steps in a few minutes)")
    parser.add_argument("--dry-run", action="store_true", help="print the steps' commands and environment; run nothing")
    parser.add_argument("--steps", type=int, nargs="+", help="run only these step numbers (the others' outputs must be in WORK)")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    gpus = 0  # counted without importing torch here: a forked child's peak RSS would include this process's
    if args.device != "cpu" and not args.dry_run and shutil.which("nvidia-smi"):
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        gpus = sum(line.startswith("GPU ") for line in listed.stdout.splitlines()) if listed.returncode == 0 else 0
    plan = steps(work, args.device, args.tiny, gpus if not args.dry_run else 2)
    env = environment(work, args.tiny)
    if args.dry_run:
        print(f"# gpu_check --dry-run: {len(plan)} steps in {work}, device {args.device}{', tiny' if args.tiny else ''}")
        print("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))
        for i, step in enumerate(plan, 1):
            extra = " ".join(f"{k}={v}" for k, v in (step.env or {}).items())
            note = f"  # skipped: {step.skip}" if step.skip else ""
            print(f"# {i:2d}. {step.name}{note}\n{extra + ' ' if extra else ''}{shlex.join(step.command)}")
        return 0
    if args.device != "cpu" and gpus == 0:
        print("gpu_check: nvidia-smi lists no GPU; run it on a CUDA machine (or --device cpu --tiny, --dry-run)", file=sys.stderr)
        return 2
    if not args.steps:
        shutil.rmtree(work, ignore_errors=True)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    machine = subprocess.run(helper("machine"), capture_output=True, text=True, env={**os.environ, **env}).stdout.strip()
    print(f"gpu_check: {machine}; {gpus} GPU(s) listed by nvidia-smi; work folder {work}", flush=True)
    rows, total = [], time.perf_counter()
    for i, step in enumerate(plan, 1):
        if args.steps and i not in args.steps:
            continue
        if step.skip:
            rows.append({"step": step.name, "result": f"skipped: {step.skip}"})
            print(f"[{i:2d}/{len(plan)}] {step.name}: skipped ({step.skip})", flush=True)
            continue
        print(f"[{i:2d}/{len(plan)}] {step.name} ...", flush=True)
        row = run_step(i, step, env, logs)
        gpu = "" if row["gpu_gib"] is None else f", peak GPU {row['gpu_gib']:.2f} GiB"
        print(f"[{i:2d}/{len(plan)}] {step.name}: {row['seconds']:.1f} s{gpu}, peak RSS {row['rss_gib']:.2f} GiB", flush=True)
        row["result"] = "ok" if row["rc"] == 0 else f"FAILED (exit {row['rc']})"
        rows.append(row)
        (work / "results.json").write_text(json.dumps(rows, indent=1))
        if row["rc"] != 0:
            tail = Path(row["log"]).read_text(errors="replace").splitlines()[-25:]
            print("\n".join(tail), file=sys.stderr)
            print(table(rows))
            print(f"gpu_check: step {i} '{step.name}' failed (exit {row['rc']}); its log: {row['log']}", file=sys.stderr)
            return 1
    print(f"\n{table(rows)}\n\ngpu_check: all steps passed in {time.perf_counter() - total:.0f} s; results in {work / 'results.json'}")
    return 0


# ---- helpers: the steps that are not a command of the installed tools ----

def make_dataset(raw: Path, tiny: bool) -> None:
    sys.path.insert(0, str(HERE))
    from bench_trainers import write_dataset

    write_dataset(raw, (TINY_TRAIN + TINY_VAL) if tiny else (TRAIN + VAL), ORGANS)
    if tiny:  # every second voxel: toy cases, 8x fewer voxels for every step
        import SimpleITK as sitk

        for path in sorted(raw.glob("*Tr/*.nii.gz")):
            sitk.WriteImage(sitk.Shrink(sitk.ReadImage(str(path)), [2, 2, 2]), str(path), useCompression=True)


def write_splits(work: Path, tiny: bool) -> None:
    train, val = (TINY_TRAIN, TINY_VAL) if tiny else (TRAIN, VAL)
    (work / "nnUNet_preprocessed" / DATASET / "splits_final.json").write_text(json.dumps(
        [{"train": [f"phantom{s:03d}" for s in train], "val": [f"phantom{s:03d}" for s in val]}]))


def tiny_plans(work: Path) -> None:
    """Shrink the networks and patches (as the tests do): CPU training in seconds."""
    plans_file = work / "nnUNet_preprocessed" / DATASET / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    for name in ("3d_fullres", "3d_fullres_ape_liver", "3d_fullres_ape"):
        config = plans["configurations"][name]
        config.update({"patch_size": [32, 32, 32], "batch_size": 2})
        arch = config.setdefault("architecture", json.loads(json.dumps(plans["configurations"]["3d_fullres"]["architecture"])))
        arch["arch_kwargs"].update({"n_stages": 3, "features_per_stage": [8, 16, 32], "kernel_sizes": [[3, 3, 3]] * 3,
                                    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage": [1, 1, 1],
                                    "n_conv_per_stage_decoder": [1, 1]})
    plans_file.write_text(json.dumps(plans, indent=1))


def make_ct(folder: Path, tiny: bool) -> None:
    """A phantom resampled (linear) onto a 512x512x300 grid over its own extent (toy: 96x96x48), as CASE_0000.nii.gz."""
    import SimpleITK as sitk

    from nnunet_ape.phantoms import make_phantom

    ct, _ = make_phantom(300)
    size = (96, 96, 48) if tiny else (512, 512, 300)
    extent = [n * s for n, s in zip(ct.GetSize(), ct.GetSpacing())]
    spacing = [e / n for e, n in zip(extent, size)]
    resampled = sitk.Resample(ct, size, sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), spacing, ct.GetDirection(), -1000.0, sitk.sitkInt16)
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(resampled, str(folder / "ct512_0000.nii.gz"), useCompression=True)


def stock_model(work: Path) -> None:
    """A stock nnUNetTrainer 3d_fullres results folder (fold 0) with the planned network and random weights."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    plans = json.loads((work / "nnUNet_preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    folder = work / "nnUNet_results" / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    shutil.copy(work / "nnUNet_raw" / DATASET / "dataset.json", folder / "dataset.json")
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(0)
    network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1,
                                     1 + len(ORGANS), deep_supervision=False)
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer", "init_args": {"configuration": "3d_fullres"},
                "inference_allowed_mirroring_axes": [0, 1, 2]}, folder / "fold_0" / "checkpoint_final.pth")


def portable_checkpoint(work: Path) -> int:
    """The pretraining trainer's final checkpoint as nnU-Net main's nnssl fine-tuning reads it (``weights_only``, no
    ``map_location``): exit 1 when a network weight would load onto a GPU, which fails on a machine without one."""
    import torch

    file = work / "nnUNet_results" / DATASET / f"{PRETRAIN_SMOKE}__nnUNetPlans__3d_fullres" / "fold_all" / "checkpoint_final.pth"
    weights = torch.load(file, weights_only=True)["network_weights"]
    devices = sorted({str(v.device) for v in weights.values()})
    print(f"{file}: {len(weights)} network weights on {', '.join(devices)}")
    return 0 if devices == ["cpu"] else 1


def compare(a: Path, b: Path) -> int:
    """Voxel agreement of the label maps of two prediction folders; exit 1 below 99.9%."""
    import numpy as np
    import SimpleITK as sitk

    worst = 1.0
    for file in sorted(a.glob("*.nii.gz")):
        x, y = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (file, b / file.name))
        agreement = float(np.mean(x == y)) if x.shape == y.shape else 0.0
        worst = min(worst, agreement)
        print(f"{file.name}: shape {x.shape} vs {y.shape}, labels {np.unique(x).tolist()} vs {np.unique(y).tolist()}, "
              f"{agreement:.6f} of the voxels agree")
    if not list(a.glob("*.nii.gz")):
        print(f"no predictions in {a}")
        return 1
    return 0 if worst >= 0.999 else 1


def run_helper(name: str, args: list[str]) -> int:
    if name == "machine":
        sys.path.insert(0, str(HERE))
        from bench_embed import machine

        print(machine())
    elif name == "dataset":
        make_dataset(Path(args[0]), args[1] == "True")
    elif name == "splits":
        write_splits(Path(args[0]), args[1] == "True")
    elif name == "tiny-plans":
        tiny_plans(Path(args[0]))
    elif name == "ct":
        make_ct(Path(args[0]), args[1] == "True")
    elif name == "stock-model":
        stock_model(Path(args[0]))
    elif name == "portable-checkpoint":
        return portable_checkpoint(Path(args[0]))
    elif name == "compare":
        return compare(Path(args[0]), Path(args[1]))
    else:
        raise SystemExit(f"unknown helper {name}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--helper":
        sys.exit(run_helper(sys.argv[2], sys.argv[3:]))
    sys.exit(main())
