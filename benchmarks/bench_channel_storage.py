"""Benchmark: what embedding channels cost a channel configuration's preprocessed data and nnU-Net's data loader.

A phantom cohort becomes an nnU-Net raw dataset; nnU-Net fingerprints, plans and preprocesses it (``3d_fullres``, CT
only); ``nnunet-ape plan`` adds whole-image channel configurations (APE + BPR, APE only, BPR only, and APE + BPR and
APE only at float16 precision, ``--channel-precision float16``) and one ``nnunet-ape preprocess`` writes them all
(one APE and one BPR pass per case). Per configuration it prints:

- disk per case: the mean size of the cases' ``CASE.b2nd`` (nnU-Net's blosc2 data file; the segmentation file is
  the same for all and listed apart) and the ratio to CT only;
- data-loader throughput: batches per CPU second through nnU-Net's own training data loader and training transforms,
  as the configuration's trainer builds them (stock ``nnUNetTrainer`` for CT only, ``nnUNetTrainerAPEChannels``
  otherwise), in this one process on one torch thread (one of nnU-Net's data-augmentation workers), the share of that
  time spent in the transforms, and the ratio to CT only. CPU time, not wall time: it is the work a worker does,
  which other work on the machine slows down but does not add to (a wall-clock rate is that divided by the share of
  a core the worker gets).

For reference it also lists (disk only, not offered) the APE + BPR data saved as a whole float16 array, CT included.
The APE and BPR networks are untrained tiny ones unless ``--model`` / ``--bpr-model`` are given: their values are
arbitrary but smooth as a trained model's are, which is what the compression sees. Absolute figures depend on the
machine and on what else runs; compare the ratios of one run.

    python benchmarks/bench_channel_storage.py [--phantoms 4] [--batches 6] [--patch 96 128 128] [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import machine  # noqa: E402

DATASET_ID = 951
DATASET = f"Dataset{DATASET_ID}_ChannelStorage"
ORGANS = {"liver": 1, "kidney_left": 2}
# configuration -> (plan arguments, label); "3d_fullres" is nnU-Net's own, CT only
CONFIGURATIONS = {
    "3d_fullres": (None, "CT only (stock)"),
    "3d_fullres_ape_bpr": (["--channels", "ape", "bpr"], "CT + APE + BPR, float32"),
    "3d_fullres_ape": (["--channels", "ape"], "CT + APE, float32"),
    "3d_fullres_bpr": (["--channels", "bpr"], "CT + BPR, float32"),
    "3d_fullres_ape_bpr_fp16": (["--channels", "ape", "bpr", "--channel-precision", "float16"], "CT + APE + BPR, float16 precision"),
    "3d_fullres_ape_fp16": (["--channels", "ape", "--channel-precision", "float16"], "CT + APE, float16 precision"),
}


def untrained_models(folder: Path) -> tuple[Path, Path]:
    """Untrained tiny APE (embedding at 4 x 4 x 5 mm) and BPR checkpoints in ``folder``; returns their paths."""
    import torch

    from nnunet_ape.bpr.train_bpr import BPR_FORMAT
    from nnunet_ape.checkpoint import APE_FORMAT, save_atomic
    from nnunet_ape.models.ape import PRESETS, APENet
    from nnunet_ape.models.bpr import BPRNet

    torch.manual_seed(0)
    ape = save_atomic({"format": APE_FORMAT, "model_config": PRESETS["tiny"].to_dict(), "model": APENet(PRESETS["tiny"]).state_dict(),
                       "embed": {"spacing": [4.0, 4.0, 5.0], "patch_size": [32, 32, 32]}}, folder / "ape_untrained.pt")
    bpr = folder / "bpr_untrained.pt"
    torch.save({"format": BPR_FORMAT, "model_config": {"trunk": "tiny"}, "model": BPRNet("tiny").state_dict()}, bpr)
    return ape, bpr


def prepare(args, roots: dict[str, Path]) -> Path:
    """Raw dataset, nnU-Net's plans and 3d_fullres data, and every channel configuration's data; returns the
    dataset's nnUNet_preprocessed folder. Runs in this process (nnU-Net reads its folders from the environment)."""
    from bench_trainers import write_dataset
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess

    from nnunet_ape.cli.main import main as nnunet_ape

    seeds = list(range(300, 300 + args.phantoms))
    write_dataset(roots["nnUNet_raw"] / DATASET, seeds, ORGANS)
    ape, bpr = (args.model, args.bpr_model) if args.model and args.bpr_model else untrained_models(args.work)
    began = time.perf_counter()
    with _quiet():
        extract_fingerprints([DATASET_ID], num_processes=1)
        plan_experiments([DATASET_ID])
    preprocessed = roots["nnUNet_preprocessed"] / DATASET
    if args.patch:  # before preprocessing: nnU-Net chunks the data files for the patch size
        plans_file = preprocessed / "nnUNetPlans.json"
        plans = json.loads(plans_file.read_text())
        plans["configurations"]["3d_fullres"]["patch_size"] = list(args.patch)
        plans_file.write_text(json.dumps(plans, indent=1))
    with _quiet():
        preprocess([DATASET_ID], configurations=("3d_fullres",), num_processes=(1,))
    print(f"  nnU-Net fingerprint, plan, preprocess 3d_fullres: {time.perf_counter() - began:.0f} s", flush=True)
    (preprocessed / "splits_final.json").write_text(json.dumps([{"train": [f"phantom{s:03d}" for s in seeds],
                                                                  "val": [f"phantom{seeds[0]:03d}"]}]))
    began = time.perf_counter()
    added = [name for name, (plan_args, _) in CONFIGURATIONS.items() if plan_args is not None]
    with _quiet():
        for name in added:
            _check(nnunet_ape(["plan", "-d", str(DATASET_ID), "-m", str(ape), "--bpr-model", str(bpr), *CONFIGURATIONS[name][0]]))
        _check(nnunet_ape(["preprocess", "-d", str(DATASET_ID), "-c", *added, "-np", "1", "--device", "cpu"]))
    print(f"  nnunet-ape plan + preprocess of {len(added)} configurations (one APE/BPR pass per case): "
          f"{time.perf_counter() - began:.0f} s", flush=True)
    return preprocessed


def _check(code: int) -> None:
    if code != 0:
        raise SystemExit(f"nnunet-ape failed (exit {code})")


@contextlib.contextmanager
def _quiet():
    """nnU-Net's progress prints off the terminal (warnings still show)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def disk_per_case(folder: Path) -> dict:
    """Mean bytes per case of ``folder``'s data files (``CASE.b2nd``) and segmentation files, the data's dtype,
    channel count and uncompressed bytes."""
    import blosc2

    data = sorted(p for p in folder.glob("*.b2nd") if not p.name.endswith("_seg.b2nd"))
    arrays = [blosc2.open(urlpath=str(p), mode="r") for p in data]
    return {"data": float(np.mean([p.stat().st_size for p in data])),
            "seg": float(np.mean([p.with_name(p.stem + "_seg.b2nd").stat().st_size for p in data])),
            "raw": float(np.mean([np.prod(a.shape) * a.dtype.itemsize for a in arrays])),
            "channels": int(arrays[0].shape[0]), "dtype": str(arrays[0].dtype), "cases": len(data)}


def whole_float16_disk(folder: Path, patch: list[int]) -> float:
    """Mean bytes per case of ``folder``'s data saved by nnU-Net's ``save_case`` as one float16 array (CT
    included; its chunking computed for float16 as nnU-Net's preprocessor computes it): what true float16 storage
    would give."""
    import blosc2
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    sizes = []
    scratch = folder.parent / "_float16_scratch"
    for path in sorted(p for p in folder.glob("*.b2nd") if not p.name.endswith("_seg.b2nd")):
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        data = blosc2.open(urlpath=str(path), mode="r")[:].astype(np.float16)
        seg = blosc2.open(urlpath=str(path.with_name(path.stem + "_seg.b2nd")), mode="r")[:]
        blocks, chunks = comp_blosc2_params(data.shape, tuple(patch), data.itemsize)
        nnUNetDatasetBlosc2.save_case(data, seg, {}, str(scratch / "case"), chunks=chunks, blocks=blocks)
        sizes.append((scratch / "case.b2nd").stat().st_size)
    shutil.rmtree(scratch, ignore_errors=True)
    return float(np.mean(sizes))


class _TimedTransforms:
    """Wraps the data loader's transforms and adds up the CPU seconds spent in them."""

    def __init__(self, transforms):
        self.transforms = transforms
        self.seconds = 0.0

    def __call__(self, **data_dict):
        began = time.process_time()
        out = self.transforms(**data_dict)
        self.seconds += time.process_time() - began
        return out


def training_loader(preprocessed: Path, configuration: str):
    """The training data loader ``configuration``'s trainer builds (nnU-Net's ``get_dataloaders`` with
    ``nnUNet_n_proc_DA=0``: loader and transforms in this process, after the one batch it draws itself), with its
    transforms timed (:class:`_TimedTransforms`); returns ``(generator, timed transforms)``."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_ape.nnunet.trainers import nnUNetTrainerAPEChannels

    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # what nnUNetv2_train's run_training adds
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    trainer_class = nnUNetTrainer if configuration == "3d_fullres" else nnUNetTrainerAPEChannels
    with _quiet():
        trainer = trainer_class(plans, configuration, 0, dataset_json, torch.device("cpu"))
        trainer.initialize()
        train, _ = trainer.get_dataloaders()
    timed = _TimedTransforms(train.data_loader.transforms)
    train.data_loader.transforms = timed
    return train, timed


def loader_throughput(preprocessed: Path, configurations: list[str], rounds: int, batches: int) -> dict[str, dict]:
    """Per configuration: batches per CPU second of its trainer's training data loader (:func:`training_loader`), the
    median over ``rounds`` rounds of ``batches`` batches (the configurations take turns in each round, so that
    load from other work spreads over all of them; each starts a round from the same random seed, so that all draw
    the same cases, patches and augmentations: the intensity augmentations draw for the image channel only, whatever
    the channel count), the median over the rounds of its rate divided by the first configuration's in the same
    round (paired: same batches), the transforms' share of the time, the last batch's shape and whether every
    value of every batch was finite."""
    import random

    import torch

    loaders = {name: training_loader(preprocessed, name) for name in configurations}
    rates: dict[str, list[float]] = {name: [] for name in configurations}
    shares: dict[str, list[float]] = {name: [] for name in configurations}
    out = {name: {"finite": True} for name in configurations}
    for round_ in range(rounds):
        for name, (train, timed) in loaders.items():
            random.seed(round_)
            np.random.seed(round_)
            torch.manual_seed(round_)
            timed.seconds = 0.0
            began = time.process_time()  # CPU time of this one-thread process: what other work beside it cannot stretch
            for _ in range(batches):
                batch = next(train)
                out[name]["finite"] &= bool(torch.isfinite(batch["data"]).all())
            seconds = time.process_time() - began
            rates[name].append(batches / seconds)
            shares[name].append(timed.seconds / seconds)
            out[name]["batch_shape"] = list(batch["data"].shape)
    first = np.asarray(rates[configurations[0]])
    for name in configurations:
        ratios = np.asarray(rates[name]) / first
        out[name].update(batches_per_s=float(np.median(rates[name])), transform_share=float(np.median(shares[name])),
                         ratio=float(np.median(ratios)), ratio_spread=(float(ratios.min()), float(ratios.max())))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", type=int, default=3, help="phantom cases (all training)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of timing (the configurations take turns in each)")
    parser.add_argument("--batches", type=int, default=2, help="timed batches per configuration and round")
    parser.add_argument("--patch", type=int, nargs=3,
                        help="patch size (nnU-Net's axis order, as in the plans) instead of the planned one")
    parser.add_argument("--model", type=Path, help="APE checkpoint (with --bpr-model; default: untrained tiny networks)")
    parser.add_argument("--bpr-model", type=Path, help="BPR checkpoint")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_channel_storage"))
    parser.add_argument("--reuse", action="store_true", help="measure the preprocessed data of an earlier run in --work again")
    args = parser.parse_args()
    roots = {k: args.work / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    last_summary = roots["nnUNet_preprocessed"] / DATASET / "nnunet_ape" / f"nnUNetPlans_{list(CONFIGURATIONS)[-1]}.crops.json"
    reuse = args.reuse and last_summary.is_file()  # written when preprocessing finished
    if args.work.exists() and not reuse:
        shutil.rmtree(args.work)
    shutil.rmtree(roots["nnUNet_results"], ignore_errors=True)
    for path in roots.values():
        path.mkdir(parents=True, exist_ok=True)
    # before nnU-Net is first imported: it reads its folders from the environment then
    os.environ.update({**{k: str(v) for k, v in roots.items()}, "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1",
                       "OMP_NUM_THREADS": "1"})
    print(f"machine: {machine()}")
    print(f"niceness {os.nice(0)}, load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: absolute "
          f"figures are not clean when other work runs beside; the ratios are measured in the same run")
    if reuse:
        preprocessed = roots["nnUNet_preprocessed"] / DATASET
        print(f"  reusing the preprocessed data in {preprocessed}")
    else:
        preprocessed = prepare(args, roots)
    import torch

    os.environ["nnUNet_n_proc_DA"] = "0"  # the trainers' loaders then run in this process (nnU-Net's planner needs >= 1)
    torch.set_num_threads(1)  # as one of nnU-Net's data-augmentation worker processes
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    patch = plans["configurations"]["3d_fullres"]["patch_size"]
    began = time.perf_counter()
    speed = loader_throughput(preprocessed, list(CONFIGURATIONS), args.rounds, args.batches)
    print(f"  data loaders: {time.perf_counter() - began:.0f} s", flush=True)
    rows = {name: {"label": label, **disk_per_case(preprocessed / f"nnUNetPlans_{name}"), **speed[name]}
            for name, (_, label) in CONFIGURATIONS.items()}
    f16 = whole_float16_disk(preprocessed / "nnUNetPlans_3d_fullres_ape_bpr", patch)
    report(args, rows, f16, patch, plans["configurations"]["3d_fullres"]["batch_size"])


def report(args, rows: dict, whole_float16: float, patch: list[int], batch_size: int) -> None:
    """The markdown table of :func:`main`'s measurements."""
    ct = rows["3d_fullres"]
    mb = 1e6
    print(f"\n{ct['cases']} phantom cases, patch {'x'.join(map(str, patch))}, batch {batch_size}, median of {args.rounds} "
          f"rounds of {args.batches} batches per configuration, one process, one torch thread (x CT only: the median of "
          f"the rounds' paired ratios, min-max in brackets); APE/BPR models: "
          f"{'given' if args.model else 'untrained tiny networks'}; load average at end {os.getloadavg()[0]:.1f}\n")
    print("| configuration | channels | data MB / case (uncompressed) | x CT only | seg MB / case | batches / CPU s | x CT only | transforms share |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| `{name}`: {r['label']} | {r['channels']} | {r['data'] / mb:.2f} ({r['raw'] / mb:.1f}) | "
              f"{r['data'] / ct['data']:.2f} | {r['seg'] / mb:.2f} | {r['batches_per_s']:.2f} | "
              f"{r['ratio']:.2f} ({r['ratio_spread'][0]:.2f}-{r['ratio_spread'][1]:.2f}) | {r['transform_share']:.0%} |")
    print(f"| (not offered) CT + APE + BPR as one float16 array, CT included | 5 | {whole_float16 / mb:.2f} | "
          f"{whole_float16 / ct['data']:.2f} | - | - | - | - |")
    bad = [name for name, r in rows.items() if not r["finite"] or r["batch_shape"][1] != r["channels"]]
    if bad:
        raise SystemExit(f"batches of {', '.join(bad)}: wrong channel count or non-finite values")


if __name__ == "__main__":
    main()
