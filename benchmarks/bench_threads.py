"""Benchmark: pretraining speed on a shared CPU, alone and beside a second CPU-heavy process, per thread setting.

The run is the test suite's APE fixture (tiny model, naive views, 2 data workers) on the real CT of ../shared/data;
each configuration pretrains ``--iterations`` iterations and the script prints seconds per iteration (after the
first 10, which include worker start-up and the cache): alone; "2 runs": the same pretraining twice at once (two
users' jobs on one server, or two test sessions); "busy": beside two single-threaded busy loops (any other CPU job).
With a fair share of the cores a run should take at most about 2x its alone time in either. ``--threads`` values are torch intra-op threads of the training process: ``torch`` is torch's
own default (one per core, whatever else runs), ``auto`` is the loop's default (cores left after the data workers).

    python benchmarks/bench_threads.py [--iterations 120] [--threads torch auto] [--work /tmp/bench_threads]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import machine  # noqa: E402

from nnunet_ape.threads import threads_per_process  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NNUNET_APE_TEST_DATA", REPO.parent / "shared" / "data" / "ct"))
IMAGES = ["ts_a_abdomen_pelvis_ct.nii.gz", "ts_b_upper_abdomen_ct.nii.gz", "ts_c_chest_cta_ct.nii.gz",
          "radiomics_lung1_ct.nrrd", "radiomics_lung2_ct.nrrd"]

RUN = '''
import sys
from pathlib import Path
from nnunet_ape.pretrain.augment import AugmentConfig
from nnunet_ape.pretrain.batches import BatchConfig
from nnunet_ape.pretrain.train_ape import PretrainConfig, pretrain_ape

out, iterations, workers, threads, cache = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
cfg = PretrainConfig(
    iterations=iterations, lr=2e-3, lr_schedule="cosine", model="tiny", device="cpu", workers=workers,
    batch=BatchConfig(variant="naive", pairs=4, voxels=1024, patch_volume=300_000, augment=AugmentConfig(p_mask=0.0)),
    checkpoint_every=10**9, threads=None if threads == "auto" else (0 if threads == "torch" else int(threads)),
)
Path(out).mkdir(parents=True)
(Path(out) / "cache").symlink_to(cache)
pretrain_ape(sys.argv[6:], Path(out), cfg)
'''


def _start(out: Path, args, threads: str) -> subprocess.Popen:
    images = [str(DATA / name) for name in IMAGES]
    return subprocess.Popen([sys.executable, "-c", RUN, str(out), str(args.iterations), str(args.workers), threads,
                             str(args.work / "cache"), *images], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _seconds_per_iteration(out: Path) -> float:
    with open(out / "log.csv", newline="") as f:
        seconds = np.array([float(r["seconds"]) for r in csv.DictReader(f)])
    return float((seconds[-1] - seconds[9]) / (len(seconds) - 10))


BUSY = "while True: pass"


def _measure(args, threads: str, copies: int, tag: str, busy: int = 0) -> list[float]:
    outs = [args.work / f"{tag}_{threads}_{i}" for i in range(copies)]
    for out in outs:
        shutil.rmtree(out, ignore_errors=True)
    loops = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        procs = [_start(out, args, threads) for out in outs]
        for proc in procs:
            if proc.wait() != 0:
                raise SystemExit(f"pretraining failed ({tag}, threads {threads}); rerun it alone to see why")
    finally:
        for loop in loops:
            loop.kill()
    return [_seconds_per_iteration(out) for out in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=120)
    parser.add_argument("--workers", type=int, default=2, help="data-loading workers per run (the test fixture's 2)")
    parser.add_argument("--threads", nargs="+", default=["torch", "auto"], help="torch, auto or a number")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_threads"))
    args = parser.parse_args()
    (args.work / "cache").mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    print(f"run: tiny APE, {args.workers} workers, {args.iterations} iterations on {len(IMAGES)} real CTs")
    warm = args.work / "warm"  # fills the shared cache so that no measured run preprocesses
    shutil.rmtree(warm, ignore_errors=True)
    _start(warm, argparse.Namespace(**{**vars(args), "iterations": 11}), "auto").wait()
    print(f"{'threads':>8} {'set to':>6} {'alone s/it':>11} {'2 runs s/it':>12} {'slowdown':>9} {'busy s/it':>10} {'slowdown':>9}")
    for threads in args.threads:
        began = time.monotonic()
        alone = _measure(args, threads, 1, "alone")[0]
        pair = float(np.mean(_measure(args, threads, 2, "pair")))
        busy = _measure(args, threads, 1, "busy", busy=2)[0]
        value = {"torch": torch_threads(), "auto": threads_per_process(workers=args.workers)}.get(threads, threads)
        print(f"{threads:>8} {value:>6} {alone:>11.3f} {pair:>12.3f} {pair / alone:>8.1f}x {busy:>10.3f} {busy / alone:>8.1f}x"
              f"   ({time.monotonic() - began:.0f} s)", flush=True)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
