"""Argument helpers shared by the ``nnunet-ape`` subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_ape.errors import InputError

# nnunet_ape.localize.fewshot.COMBINE and DEFAULT_COMBINE, spelled out so that --help does not import torch (a test
# keeps them equal)
COMBINE_CHOICES = ("mean", "median", "trimmed")
DEFAULT_COMBINE = "trimmed"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it says something: not for required options, flags, unset (None) or empty
    defaults, nor where the help text already names the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or action.default in (None, False, [], argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def triple(kind):
    """argparse type for three numbers written ``a,b,c`` or ``axbxc``."""

    def parse(text: str):
        parts = text.replace("x", ",").split(",")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"expected three numbers like 1.5,1.5,2.25, got {text!r}")
        return tuple(kind(p) for p in parts)

    return parse


def add_case_source_args(parser: argparse.ArgumentParser) -> None:
    """Options naming labeled cases: an nnU-Net raw dataset, or image and label folders."""
    parser.add_argument("-d", "--dataset", help="nnU-Net raw dataset (folder, name or id): imagesTr + labelsTr + dataset.json")
    parser.add_argument("--images", type=Path, help="folder of CTs (instead of -d), or one CT file")
    parser.add_argument("--labels", type=Path, help="folder of label maps named like the CTs (with --images), or the CT file's label file")
    parser.add_argument("--label-names", type=Path, help="JSON naming the label values ({name: value} or {value: name}), with --images")


def add_labeled_case_args(parser: argparse.ArgumentParser, shots_help: str) -> None:
    """Options naming labeled cases (nnU-Net dataset or image/label folders), organs, shots and box settings."""
    parser.add_argument("-m", "--model", type=Path, help="APE checkpoint")
    parser.add_argument("--bpr-model", type=Path, help="BPR checkpoint: adds z-ranges from slice scores (z only, or z for APE's x/y)")
    add_case_source_args(parser)
    parser.add_argument("--organs", nargs="+", help="organ names (or label values); default: every labeled organ")
    parser.add_argument("--shots", type=int, default=5, help=shots_help)
    parser.add_argument("--target-recall", type=float, default=0.99, help="fraction of each organ the enlarged box must keep")
    parser.add_argument("--combine", choices=COMBINE_CHOICES, default=DEFAULT_COMBINE,
                        help="combine per-shot boxes side by side: trimmed (the mean without the lowest and highest 20%% "
                             "of the shots per side; robust to a stray shot; the mean below 5 shots), mean (the paper) "
                             "or median")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def labeled_cases(args):
    """The labeled cases named by ``add_labeled_case_args`` options; InputError when none are named."""
    from nnunet_ape.cases import cases_from_folders, cases_from_nnunet, read_label_names

    if args.dataset:
        return cases_from_nnunet(args.dataset)
    if args.images and args.labels:
        return cases_from_folders(args.images, args.labels, read_label_names(args.label_names) if args.label_names else None)
    raise InputError("give the labeled cases with -d DATASET or with --images DIR --labels DIR")


def add_channel_args(parser: argparse.ArgumentParser) -> None:
    """``--channels`` and the APE/BPR checkpoints they (or a moved localizer) need."""
    parser.add_argument("--channels", nargs="+", default=[], metavar="{ape,bpr}",
                        help="add embedding channels as noNorm inputs: ape (3: APE x, y, z of the whole CT), bpr (1: slice score)")
    parser.add_argument("-m", "--model", type=Path, help="APE checkpoint: for --channels ape, or if the localizer's moved")
    parser.add_argument("--bpr-model", type=Path, help="BPR checkpoint: for --channels bpr, or if the localizer's moved")
