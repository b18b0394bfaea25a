"""Benchmark: `nnunet-ape pretrain ape` on a shared machine: seconds per iteration alone and beside another
CPU-heavy process (a numpy matrix-multiply loop using every core), as users run on shared servers.

A fair share of 2 cores with one other busy process is half of them, so a well-behaved loop runs about 2x slower
beside it; thread oversubscription (torch intra-op threads in the main process plus threads in every data-loading
worker, OpenMP threads spinning while they wait for each other) makes it far slower than that.

    python benchmarks/bench_shared_cpu.py [--iterations 60] [--workers 1] [--model small]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import machine  # noqa: E402

HEAD_NECK = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "Dataset901_HeadNeckCT" / "imagesTr"
HOG = "import numpy as np\na = np.random.rand(1500, 1500)\nwhile True:\n    a @ a\n"


def seconds_per_iteration(work: Path, images: Path, iterations: int, workers: int, model: str, env: dict) -> float:
    """Median seconds per iteration of a short pretraining run (the first 10 iterations, warm-up, left out)."""
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    done = subprocess.run([str(Path(sys.executable).parent / "nnunet-ape"), "pretrain", "ape", "-i", str(images), "-o", str(out),
                           "--iterations", str(iterations), "--model", model, "--workers", str(workers), "--device", "cpu",
                           "--checkpoint-every", str(iterations)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"pretrain failed:\n{done.stderr[-3000:]}")
    with open(out / "log.csv") as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    steps = sorted(b - a for a, b in zip(seconds[10:], seconds[11:]))
    return steps[len(steps) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model", default="small")
    parser.add_argument("--cases", type=int, default=20, help="head-and-neck CTs to pretrain on")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_shared_cpu"))
    args = parser.parse_args()
    print(f"machine: {machine()}")
    images = args.work / "images"
    if not images.is_dir():
        images.mkdir(parents=True)
        for path in sorted(HEAD_NECK.glob("*_0000.nii.gz"))[: args.cases]:
            (images / path.name).symlink_to(path)
    env = dict(os.environ)
    alone = seconds_per_iteration(args.work, images, args.iterations, args.workers, args.model, env)
    hog = subprocess.Popen([sys.executable, "-c", HOG])
    try:
        time.sleep(2)
        shared = seconds_per_iteration(args.work, images, args.iterations, args.workers, args.model, env)
    finally:
        hog.kill()
    print(f"pretrain ape --model {args.model} --workers {args.workers}, {args.cases} head-and-neck CTs, {os.cpu_count()} cores")
    print("| | s / iteration | x alone |")
    print("|---|---|---|")
    print(f"| alone | {alone:.3f} | 1.0 |")
    print(f"| beside a busy process | {shared:.3f} | {shared / alone:.1f} |")


if __name__ == "__main__":
    main()
