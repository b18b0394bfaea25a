"""``nnunet-ape`` command line: ``demo``, ``pretrain``, ``embed``, ``localize``, ``score``, ``calibrate``, ``evaluate``;
each has ``--help``.

Each subcommand lives in its own ``cli_*`` module; this one assembles them and turns InputError into a one-line
message and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from nnunet_ape import cli_demo, cli_embed, cli_evaluate, cli_localize, cli_pretrain, cli_score
from nnunet_ape.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    """The ``nnunet-ape`` argument parser with all subcommands."""
    parser = argparse.ArgumentParser(
        prog="nnunet-ape",
        description="Anatomical Positional Embeddings for nnU-Net v2: pretrain, embed, localize, score slices (BPR) and segment CT.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli_demo.add_parser(sub)
    pretrain = sub.add_parser("pretrain", help="self-supervised pretraining (ape, bpr)", description="Self-supervised pretraining.")
    pretrain_sub = pretrain.add_subparsers(dest="model_kind", required=True, metavar="MODEL")
    cli_pretrain.add_parser(pretrain_sub)
    cli_embed.add_parser(sub)
    cli_localize.add_parser(sub)
    cli_score.add_parser(sub)
    cli_evaluate.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nnunet-ape`` console script; returns the exit code (2 for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except InputError as error:
        print(f"nnunet-ape: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
