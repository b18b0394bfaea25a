"""``nnunet-ape pretrain ape`` and ``pretrain bpr``: self-supervised pretraining on unlabeled CT."""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_ape.cli.common import HelpFormatter
from nnunet_ape.errors import InputError

INPUT_HELP = ("folder of CT files (NIfTI, NRRD, MHA, DICOM folders), a list file (one path per line), "
              "or an nnU-Net raw dataset (id, name or folder)")


def _add_loop_args(p: argparse.ArgumentParser, lr: float) -> None:
    """Options every pretraining loop has (see :class:`nnunet_ape.pretrain.loop.LoopConfig`)."""
    p.add_argument("-i", "--input", required=True, help=INPUT_HELP)
    p.add_argument("-o", "--output", required=True, type=Path, help="run folder: checkpoints, log.csv, loss.png, cache/")
    p.add_argument("--iterations", type=int, default=150_000, help="total training iterations (batches)")
    p.add_argument("--lr", type=float, default=lr, help="AdamW learning rate")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant", help="constant (the paper) or cosine decay to 0 at --iterations (better for short runs)")
    p.add_argument("--weight-decay", type=float, default=1e-6, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--workers", type=int, default=4, help="background data-loading processes per GPU/process")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the training process (default: the "
                   "cores this process may use, less --workers, at least 1; 0: torch's own choice, one per core)")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="iterations between checkpoints (a killed run loses at most this many)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this many minutes")
    p.add_argument("--seed", type=int, default=0, help="random seed of the views, augmentations and initial weights")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint_last.pt (optimizer, iteration count, log)")


def _loop_kwargs(args) -> dict:
    return dict(
        iterations=args.iterations, lr=args.lr, lr_schedule=args.lr_schedule, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, device=args.device, amp=not args.no_amp, workers=args.workers, threads=args.threads,
        checkpoint_every=args.checkpoint_every, max_minutes=args.max_minutes, seed=args.seed,
    )


def add_parser(sub) -> None:
    """Register ``ape`` and ``bpr`` under the ``pretrain`` command's subparsers ``sub``."""
    from nnunet_ape.models.config import PRESETS, TRUNKS
    from nnunet_ape.pretrain.choices import FOREGROUND_HU, POINT_MODES, VARIANTS

    p = sub.add_parser(
        "ape",
        help="self-supervised APE pretraining on unlabeled CT",
        description="Pretrain an Anatomical Positional Embedding model on unlabeled CT (labels are ignored). "
        "The optimization and batch defaults follow the paper: AdamW lr 3e-4, weight decay 1e-6, clipping 1.0, "
        "n=8 view pairs, N=8000 voxel pairs, 150k iterations; where the voxel pairs fall (--points) the paper does not "
        "say, and the default is ours. Launch with 'torchrun --nproc_per_node G -m nnunet_ape pretrain ape ...' for "
        "data-parallel.",
        formatter_class=HelpFormatter,
    )
    _add_loop_args(p, lr=3e-4)
    p.add_argument("--variant", choices=VARIANTS, default="equiv", help="naive: single views; aug: pairs of augmented overlapping views; equiv: aug + equivariance loss")
    p.add_argument("--equiv-weight", type=float, default=1.0, help="lambda of the equivariance loss (variant equiv)")
    p.add_argument("--pairs", type=int, default=8, help="n: views (naive) or view pairs per batch, all from one CT")
    p.add_argument("--voxels", type=int, default=8000, help="N: voxels (pairs) per batch, split evenly over the n views")
    p.add_argument("--patch-volume", type=int, default=96 * 96 * 64, help="voxels per view; the shape is random with aspect ratio <= 2")
    p.add_argument("--model", choices=sorted(PRESETS), default="base", help="network size: tiny (tests, demo), small, base (real use)")
    p.add_argument("--spacing", default="paper", metavar="paper|coarse|LOW:HIGH",
                   help="spacing range of the views in mm: paper (1,1,1.5:2,2,3), coarse (4,4,6:5,5,7.5; learns anatomy "
                   "faster in short CPU runs) or LOW:HIGH such as 3,3,4.5:4,4,6; embedding later uses the middle spacing")
    p.add_argument("--max-scan-fraction", type=float, default=0.6, metavar="F",
                   help="a view spans at most this fraction of its CT along z (0 = no limit). Views longer than the "
                   "scan show its cut ends, and the model then learns position within the scan window instead of "
                   "anatomy (see docs/pretraining.md)")
    p.add_argument("--points", choices=POINT_MODES, default="uniform",
                   help="where each view's voxel pairs fall: uniform (anywhere in the view, air around the body "
                   f"included), body (above {FOREGROUND_HU:g} HU only, where localize searches the map: better box "
                   "IoU on real CT, but its label transfer lost organs on cut scans in one run; see "
                   "docs/benchmarks.md), balanced "
                   "(half body, half air, as the APE authors' released code)")
    p.set_defaults(func=_run_pretrain_ape)

    b = sub.add_parser(
        "bpr",
        help="self-supervised Body Part Regression pretraining on unlabeled CT",
        description="Pretrain a slice scorer whose score rises from feet to head (Yan et al. 2018): m equidistant axial "
        "slices per CT at a random gap, resampled to 3.5 mm and 128x128 pixels, HU clipped to [-1000, 1500] (as the "
        "reference implementation bpreg); order and distance losses, and bpreg's heuristic order loss, weighted by flags.",
        formatter_class=HelpFormatter,
    )
    _add_loop_args(b, lr=1e-4)
    b.add_argument("--trunk", choices=sorted(TRUNKS), default="efficientnet", help="2D trunk (timm); vgg16 is the reference's, tiny is ours for tests")
    b.add_argument("--slices", type=int, default=8, help="m: equidistant slices per CT")
    b.add_argument("--cts", type=int, default=4, help="CTs per batch")
    b.add_argument("--order-weight", type=float, default=1.0, help="weight of Yan's order loss")
    b.add_argument("--distance-weight", type=float, default=1.0, help="weight of Yan's distance loss")
    b.add_argument("--heuristic-weight", type=float, default=0.0, help="weight of bpreg's heuristic order loss")
    b.add_argument("--augment", choices=("none", "light", "bpreg"), default="light",
                   help="slice augmentations, drawn once per CT: light = noise, HU shift/scale, circular frame, flip, blur; "
                   "bpreg = also transpose and scale/rotate (the reference's set; slowed learning in our short runs)")
    b.set_defaults(func=_run_pretrain_bpr)


def _run_pretrain_ape(args) -> None:
    from nnunet_ape.inputs import resolve_images
    from nnunet_ape.pretrain.batches import BatchConfig
    from nnunet_ape.pretrain.train_ape import PretrainConfig, parse_spacing_range, pretrain_ape

    spacing_range = parse_spacing_range(args.spacing)  # a typo fails before any work
    if not 0.0 <= args.max_scan_fraction <= 1.0:
        raise InputError(f"--max-scan-fraction {args.max_scan_fraction}: must lie in [0, 1] (0 = no limit)")
    images = resolve_images(args.input)
    cfg = PretrainConfig(
        **_loop_kwargs(args),
        equiv_weight=args.equiv_weight,
        model=args.model,
        batch=BatchConfig(variant=args.variant, pairs=args.pairs, voxels=args.voxels, patch_volume=args.patch_volume,
                          spacing_range=spacing_range, max_scan_fraction=args.max_scan_fraction,
                          points=args.points),
    )
    final = pretrain_ape(images, args.output, cfg, resume=args.resume)
    print(f"model: {final}")


def _run_pretrain_bpr(args) -> None:
    from nnunet_ape.bpr.train_bpr import BPRConfig, pretrain_bpr
    from nnunet_ape.inputs import resolve_images

    cfg = BPRConfig(
        **_loop_kwargs(args), trunk=args.trunk, slices=args.slices, cts=args.cts, order_weight=args.order_weight,
        distance_weight=args.distance_weight, heuristic_weight=args.heuristic_weight, augment=args.augment,
    )
    final = pretrain_bpr(resolve_images(args.input), args.output, cfg, resume=args.resume)
    print(f"model: {final}")
