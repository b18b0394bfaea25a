"""``nnunet-ape embed``: whole-volume APE maps."""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_ape.cli.common import HelpFormatter, triple
from nnunet_ape.errors import InputError


def add_parser(sub) -> None:
    """Register the ``embed`` command on the ``nnunet-ape`` subparsers ``sub``."""
    p = sub.add_parser(
        "embed",
        help="APE map of whole CT volumes (3-component NIfTI in the input's geometry)",
        description="Embed CTs patch-wise with overlapping, Gaussian-blended windows. The output overlays the input "
        "exactly (same size, spacing, origin, direction) unless --stride 4 is given (every 4th voxel, spacing x4).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("-m", "--model", required=True, type=Path, help="checkpoint written by 'nnunet-ape pretrain ape'")
    p.add_argument("-i", "--input", required=True, help="CT file, DICOM folder, folder of CTs, list file or nnU-Net raw dataset")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder (CASE_ape.nii.gz per case), or a file name for a single input")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--float16", action="store_true", help="store the map as float16 (half the size)")
    p.add_argument("--stride", type=int, choices=(1, 4), default=1, help="4: store every 4th voxel only (for storage)")
    p.add_argument("--spacing", type=triple(float), default=None, help="mm the CT is resampled to for the network, e.g. 1.5,1.5,2.25 (default: the checkpoint's)")
    p.add_argument("--patch-size", type=triple(int), default=None, help="window in voxels at that spacing (default: the checkpoint's)")
    p.add_argument("--overlap", type=float, default=0.5, help="overlap of neighbouring windows (0-0.9)")
    p.add_argument("--batch-size", type=int, default=2, help="windows per forward pass")
    p.add_argument("--png", action="store_true", help="also write CASE_ape.png: the three channels as RGB over the CT in three planes")
    p.add_argument("--overwrite", action="store_true", help="replace maps that exist (default: keep them, so a restarted job "
                   "skips the cases it finished)")
    p.set_defaults(func=_run_embed)


def _run_embed(args) -> None:
    from nnunet_ape.checkpoint import load_ape_settings
    from nnunet_ape.distributed import resolve_device
    from nnunet_ape.embed import stored_settings
    from nnunet_ape.embed_files import embed_files
    from nnunet_ape.inputs import resolve_images

    if not 0 <= args.overlap < 0.95:
        raise InputError(f"--overlap {args.overlap}: must be in [0, 0.95)")
    images = resolve_images(args.input)
    settings = stored_settings(
        load_ape_settings(args.model), spacing=args.spacing, patch_size=args.patch_size, overlap=args.overlap,
        batch_size=args.batch_size, stride=args.stride, half=args.float16,
    )
    embed_files(args.model, images, args.output, settings, str(resolve_device(args.device)), png=args.png,
                overwrite=args.overwrite)
