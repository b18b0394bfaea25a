"""``nnunet-ape demo``: the pipeline on built-in phantoms."""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_ape.cli.common import HelpFormatter


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="end-to-end run on built-in synthetic CT phantoms (no data needed)",
        description="Generate a small synthetic CT cohort, pretrain a tiny APE model on it (2000 iterations, a few CPU minutes), embed a "
        "held-out phantom and write an overlay PNG and a report.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("-o", "--output", type=Path, default=Path("nnunet_ape_demo"), help="demo folder (must not exist yet, unless --resume)")
    p.add_argument("--cases", type=int, default=12, help="phantoms to pretrain on (one more is held out)")
    p.add_argument("--iterations", type=int, default=None, help="pretraining iterations (default: 2000, about 4 min on 2 quiet CPU cores)")
    p.add_argument("--minutes", type=float, default=10.0, help="time cap of the pretraining: it stops there even if the "
                   "iterations are not done, and the report says so")
    p.add_argument("--model", default="tiny", choices=("tiny", "small", "base"), help="network size (tiny trains fastest on a CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=2, help="background data-loading processes")
    p.add_argument("--seed", type=int, default=0, help="random seed of the phantoms and the pretraining")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in the same folder")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> None:
    from nnunet_ape.demo import DEMO_ITERATIONS, run_demo

    run_demo(args.output, args.cases, args.minutes, args.model, args.device, args.workers, args.seed, args.resume,
             args.iterations or DEMO_ITERATIONS)
