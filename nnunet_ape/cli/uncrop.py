"""``nnunet-ape uncrop``: paste predictions of crop-dataset models back onto the source CTs."""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_ape.cli.common import HelpFormatter


def add_parser(sub) -> None:
    """Register the ``uncrop`` command on the ``nnunet-ape`` subparsers ``sub``."""
    parser = sub.add_parser(
        "uncrop",
        help="paste nnUNetv2_predict outputs of crop datasets back onto the source CTs",
        description="Each input is a folder written by nnUNetv2_predict for a model trained on a crop dataset; its "
        "dataset.json names the crop dataset, whose crops.json (in $nnUNet_raw) gives each case's box and source "
        "geometry. Writes one label map per case with the source CT's exact size, spacing, origin and direction and "
        "the source dataset's label values, background outside the boxes. Several inputs are merged into one map: "
        "where their labels overlap, the first input given wins.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-i", "--input", nargs="+", required=True, type=Path, help="prediction folder(s), in priority order")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    parser.add_argument("--manifest", nargs="+", type=Path, help="crops.json per input, if nnUNet_raw does not hold the crop datasets")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: keep them)")
    parser.set_defaults(func=_run)


def _run(args) -> None:
    from nnunet_ape.nnunet.uncrop import open_predictions, uncrop

    sets = open_predictions(args.input, args.manifest)
    written = uncrop(sets, args.output, args.overwrite)
    print(f"{len(written)} label map(s) on the source grids -> {args.output}")
