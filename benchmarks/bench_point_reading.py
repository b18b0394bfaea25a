"""Benchmark: one APE pretraining step with the map read at the batch's points, against upsampling every voxel first.

Times forward + backward of the APE network on a batch shaped like pretraining's (``--views`` views of
``--view-volume`` voxels, ``--points`` points read per view, the paper's distance loss on them), both ways in the
same process, alternating, and prints the median seconds per step and their ratio for each ``--model`` preset.
Random inputs: the cost does not depend on what the voxels hold.

    python benchmarks/bench_point_reading.py [--models tiny small] [--steps 10] [--device cpu]

Defaults: the test fixture's batch (4 naive views of 300k voxels, 256 points each); the README's CPU recipe
(``--pairs 4 --voxels 2048``, equiv) is ``--views 8 --points 512``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import machine  # noqa: E402

from nnunet_ape.models.ape import PRESETS, APENet  # noqa: E402
from nnunet_ape.pretrain.loss import ape_loss, ape_loss_at_points  # noqa: E402


def _step(model: APENet, views: torch.Tensor, coords: torch.Tensor, positions: torch.Tensor, at_points: bool) -> float:
    """Seconds of one forward + backward, the map read at the points (``at_points``) or upsampled first."""
    if views.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    if at_points:
        loss, _ = ape_loss_at_points(model(views, coords), positions, "naive")
    else:
        loss, _ = ape_loss(model(views), coords, positions, "naive")
    loss.backward()
    if views.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], choices=sorted(PRESETS))
    parser.add_argument("--views", type=int, default=4, help="views per batch (the test fixture's: 4 naive views)")
    parser.add_argument("--view-volume", type=int, default=300_000, help="voxels per view (a cube of about this volume)")
    parser.add_argument("--points", type=int, default=256, help="points read per view (the fixture's 1024 voxels over 4 views)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per way (after one untimed)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    side = round(args.view_volume ** (1 / 3))
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}; device {device}")
    print(f"{args.views} views of {side}^3 voxels, {args.points} points read per view, {args.steps} steps each way")
    print("| model | upsample every voxel, then read (s/step) | read at the points (s/step) | speed-up |")
    print("|---|---|---|---|")
    torch.manual_seed(0)
    for name in args.models:
        model = APENet(PRESETS[name]).to(device).train()
        views = torch.randn(args.views, 1, side, side, side, device=device)
        coords = torch.rand(args.views, args.points, 3, device=device) * (side - 1)
        positions = torch.randn(args.views, args.points, 3, device=device) * 100
        times = {False: [], True: []}
        for way in (False, True):  # warm-up
            _step(model, views, coords, positions, way)
        for _ in range(args.steps):
            for way in (False, True):
                times[way].append(_step(model, views, coords, positions, way))
        full, points = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {name} | {full:.3f} | {points:.3f} | {full / points:.2f}x |")


if __name__ == "__main__":
    main()
