"""``nnunet-ape`` command line: ``demo``, ``pretrain``, ``embed``, ``localize``, ``score``, ``calibrate``, ``evaluate``,
``crop-dataset``, ``channels-dataset``, ``uncrop``, ``unlabeled-dataset``, ``plan``, ``preprocess``, ``predict``, ``trainers-path``;
each has ``--help``.

Each subcommand lives in its own module of this package; this one assembles them and turns InputError into a one-line
message and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from nnunet_ape.cli import crop_dataset, demo, embed, evaluate, localize, plan, predict, preprocess, pretrain, score, trainers_path, uncrop, unlabeled_dataset
from nnunet_ape.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    """The ``nnunet-ape`` argument parser with all subcommands."""
    parser = argparse.ArgumentParser(
        prog="nnunet-ape",
        description="Anatomical Positional Embeddings for nnU-Net v2: pretrain, embed, localize, score slices (BPR) and segment CT.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_parser(sub)
    pretrain_parser = sub.add_parser("pretrain", help="self-supervised pretraining (ape, bpr)", description="Self-supervised pretraining.")
    pretrain_sub = pretrain_parser.add_subparsers(dest="model_kind", required=True, metavar="MODEL")
    pretrain.add_parser(pretrain_sub)
    embed.add_parser(sub)
    localize.add_parser(sub)
    score.add_parser(sub)
    evaluate.add_parser(sub)
    crop_dataset.add_parser(sub)
    uncrop.add_parser(sub)
    unlabeled_dataset.add_parser(sub)
    plan.add_parser(sub)
    preprocess.add_parser(sub)
    predict.add_parser(sub)
    trainers_path.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nnunet-ape`` console script; returns the exit code (2 for bad input)."""
    args = build_parser().parse_args(argv)
    # Imported after parsing: it brings torch (seconds), which ``--help`` and usage errors do without.
    from nnunet_ape.nnunet.checkpoint_reader import register_nnunet_checkpoint_reader

    register_nnunet_checkpoint_reader()  # embed, localize, crop-dataset, ... take nnUNetTrainerAPEPretrain checkpoints
    try:
        args.func(args)
    except InputError as error:
        print(f"nnunet-ape: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
