"""``nnunet-ape demo``: the product end to end on built-in phantoms."""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_ape.cli.common import HelpFormatter
from nnunet_ape.models.config import PRESETS


def add_parser(sub) -> None:
    """Register the ``demo`` command on the ``nnunet-ape`` subparsers ``sub``."""
    p = sub.add_parser(
        "demo",
        help="the product end to end on built-in synthetic CT phantoms (no data needed, about 10 min on 2 CPU cores)",
        description="Generate synthetic CT phantoms, pretrain a tiny APE model on the training ones, fit a localizer on "
        "their labels, write an nnU-Net crop dataset, plan, preprocess and train a crop model and a full-image model "
        "with nnU-Net for the same time (small CPU plans), predict the held-out phantoms with both (nnunet-ape "
        "predict), and report Dice, prediction time and the localizer's hold on each organ, with a contour figure. "
        "Everything lands in the demo folder (nnU-Net's folders included); nothing is downloaded.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("-o", "--output", type=Path, default=Path("nnunet_ape_demo"), help="demo folder (must not exist yet, unless --resume)")
    p.add_argument("--cases", type=int, default=12, help="training phantoms: APE pretraining, localizer shots, nnU-Net training")
    p.add_argument("--heldout", type=int, default=3, help="held-out phantoms, used only to score the models")
    p.add_argument("--organs", nargs="+", default=["spleen"], help="organs to localize, crop for and segment")
    p.add_argument("--iterations", type=int, default=None, help="APE pretraining iterations (default: 2000, about 4 min on 2 quiet CPU cores)")
    p.add_argument("--minutes", type=float, default=10.0, help="time cap of the pretraining: it stops there even if the "
                   "iterations are not done, and the report says so")
    p.add_argument("--train-minutes", type=float, default=2.5, help="training time of each nnU-Net model (the crop and the full-image one get the same)")
    p.add_argument("--no-nnunet", action="store_true", help="stop after the localizer and the crop dataset (no nnU-Net training)")
    p.add_argument("--model", default="tiny", choices=tuple(PRESETS), help="APE network size (tiny trains fastest on a CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=2, help="background data-loading processes of the pretraining")
    p.add_argument("--seed", type=int, default=0, help="random seed of the phantoms and the pretraining")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in the same folder")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> None:
    from nnunet_ape.demo import DEMO_ITERATIONS, run_demo

    run_demo(args.output, args.cases, args.minutes, args.model, args.device, args.workers, args.seed, args.resume,
             args.iterations or DEMO_ITERATIONS, args.heldout, tuple(args.organs), args.train_minutes, not args.no_nnunet)
