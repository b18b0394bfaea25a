"""``nnunet-ape pretrain ape``: self-supervised APE pretraining."""

from __future__ import annotations

import argparse
from pathlib import Path



def add_parser(sub) -> None:
    from nnunet_ape.pretrain.batches import VARIANTS
    from nnunet_ape.models.ape import PRESETS

    p = sub.add_parser(
        "ape",
        help="self-supervised APE pretraining on unlabeled CT",
        description="Pretrain an Anatomical Positional Embedding model on unlabeled CT (labels are ignored). "
        "Defaults follow the paper: AdamW lr 3e-4, weight decay 1e-6, clipping 1.0, n=8 view pairs, N=8000 voxel "
        "pairs, 150k iterations. Launch with 'torchrun --nproc_per_node G nnunet-ape pretrain ape ...' for data-parallel.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("-i", "--input", required=True, help="folder of CT files (NIfTI, NRRD, MHA, DICOM folders), a list file (one path per line), or an nnU-Net raw dataset (id, name or folder)")
    p.add_argument("-o", "--output", required=True, type=Path, help="run folder: checkpoints, log.csv, loss.png, cache/")
    p.add_argument("--variant", choices=VARIANTS, default="equiv", help="naive: single views; aug: pairs of augmented overlapping views; equiv: aug + equivariance loss")
    p.add_argument("--equiv-weight", type=float, default=1.0, help="lambda of the equivariance loss (variant equiv)")
    p.add_argument("--iterations", type=int, default=150_000, help="total training iterations (batches)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (constant)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant", help="constant (the paper) or cosine decay to 0 at --iterations (better for short runs)")
    p.add_argument("--weight-decay", type=float, default=1e-6, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument("--pairs", type=int, default=8, help="n: views (naive) or view pairs per batch, all from one CT")
    p.add_argument("--voxels", type=int, default=8000, help="N: voxels (pairs) per batch, split evenly over the n views")
    p.add_argument("--patch-volume", type=int, default=96 * 96 * 64, help="voxels per view; the shape is random with aspect ratio <= 2")
    p.add_argument("--model", choices=sorted(PRESETS), default="base", help="network size: tiny (tests, demo), small, base (real use)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--workers", type=int, default=4, help="background data-loading processes per GPU/process")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="iterations between checkpoints (a killed run loses at most this many)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this many minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint_last.pt (optimizer, iteration count, log)")
    p.set_defaults(func=_run_pretrain_ape)


def _run_pretrain_ape(args) -> None:
    from nnunet_ape.inputs import resolve_images
    from nnunet_ape.pretrain.batches import BatchConfig
    from nnunet_ape.pretrain.train_ape import PretrainConfig, pretrain_ape

    images = resolve_images(args.input)
    cfg = PretrainConfig(
        equiv_weight=args.equiv_weight,
        iterations=args.iterations,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        model=args.model,
        batch=BatchConfig(variant=args.variant, pairs=args.pairs, voxels=args.voxels, patch_volume=args.patch_volume),
        device=args.device,
        amp=not args.no_amp,
        workers=args.workers,
        checkpoint_every=args.checkpoint_every,
        max_minutes=args.max_minutes,
        seed=args.seed,
    )
    final = pretrain_ape(images, args.output, cfg, resume=args.resume)
    print(f"model: {final}")
