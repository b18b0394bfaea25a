"""``nnunet-ape crop-dataset`` and ``channels-dataset``: new nnU-Net raw datasets of organ crops and/or
embedding channels, for stock nnU-Net training."""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_ape.cli.common import HelpFormatter, add_channel_args
from nnunet_ape.errors import InputError

DEFAULT_MARGIN_MM = 10.0  # = nnunet_ape.nnunet.crop_dataset.DEFAULT_MARGIN_MM; not imported, so --help needs no torch
MIN_VOXELS = 8  # = nnunet_ape.nnunet.crop_dataset.MIN_VOXELS


def add_parser(sub) -> None:
    """Register the ``crop-dataset`` command on the ``nnunet-ape`` subparsers ``sub``."""
    crop = sub.add_parser(
        "crop-dataset",
        help="write a new nnU-Net raw dataset of organ crops (and embedding channels) from an existing one",
        description="Crop every case of an nnU-Net raw dataset (imagesTr + labelsTr, imagesTs) to its organ box and write "
        "$nnUNet_raw/DatasetYYY_NAME, ready for nnUNetv2_plan_and_preprocess and stock nnUNetv2_train. Test cases get the "
        "localizer's crop box; training cases get that box grown to hold their whole label plus --margin-mm (a network "
        "never learns a cut organ). Crops keep the source's voxel grid (no resampling; origin moved to the box corner). "
        "Labels: the chosen organs, renumbered 1..K in the order given. crops.json records each case's box and source "
        "geometry for 'nnunet-ape uncrop'. A killed run resumes where it stopped when started again with the same options.",
        formatter_class=HelpFormatter,
    )
    _add_common(crop)
    crop.add_argument("-l", "--localizer", required=True, type=Path, help="localizer JSON from 'nnunet-ape localize fit'")
    crop.add_argument("--organs", nargs="+", help="organs to crop for (one box per case: the union of theirs) and to keep as labels 1..K, in this order; default: the localizer's")
    crop.add_argument("--margin-mm", type=float, default=DEFAULT_MARGIN_MM, help="how far a training case's box reaches beyond its label")
    crop.add_argument("--keep-labels", action="store_true", help="keep every source label inside the crop (source values) instead of the chosen organs only")
    crop.set_defaults(func=_run_crop)
    channels = sub.add_parser(
        "channels-dataset",
        help="write a new nnU-Net raw dataset: whole images plus APE/BPR channels",
        description="Copy every case of an nnU-Net raw dataset and add the embedding channels (noNorm): 3 APE channels "
        "with -m, 1 BPR channel with --bpr-model (--channels defaults to the models given). Labels and geometry unchanged. "
        "Writes $nnUNet_raw/DatasetYYY_NAME.",
        formatter_class=HelpFormatter,
    )
    _add_common(channels)
    channels.set_defaults(func=_run_channels)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="source nnU-Net raw dataset: id, DatasetXXX_Name or folder")
    parser.add_argument("-o", "--output", required=True, type=int, help="id of the new dataset (unused in nnUNet_raw, nnUNet_preprocessed and nnUNet_results)")
    parser.add_argument("--name", help="name of the new dataset (DatasetYYY_NAME); default: from the source and organs")
    add_channel_args(parser)
    parser.add_argument("--num-processes", type=int, default=1, help="cases processed in parallel (each process loads the models)")
    parser.add_argument("-num_parts", "--num-parts", type=int, default=1, help="split the cases into this many parts, run "
                        "as separate jobs (SLURM arrays, several GPUs); the last part to finish assembles the dataset")
    parser.add_argument("-part_id", "--part-id", type=int, default=0, help="which part this job writes (0 .. num-parts - 1)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _default_name(source: Path, organs: list[str], suffix: str) -> str:
    stem = source.name.split("_", 1)[1] if source.name.startswith("Dataset") and "_" in source.name else source.name
    return stem + "".join(part.capitalize() for organ in organs for part in organ.replace("-", "_").split("_")) + suffix


def _run_crop(args) -> None:
    _run(args, args.localizer, args.organs, args.margin_mm, args.keep_labels, "Crop")


def _run_channels(args) -> None:
    if not args.channels:  # the channels of the models given
        args.channels = [c for c, model in (("ape", args.model), ("bpr", args.bpr_model)) if model]
    if not args.channels:
        raise InputError("channels-dataset: give an APE model (-m) and/or a BPR model (--bpr-model) for the channels")
    _run(args, None, None, 0.0, True, "APE" if "ape" in args.channels else "BPR")


def _run(args, localizer: Path | None, organs: list[str] | None, margin_mm: float, keep_labels: bool, suffix: str) -> None:
    from nnunet_ape.case_features import check_channels, load_feature_models
    from nnunet_ape.distributed import resolve_device
    from nnunet_ape.nnunet.crop_dataset import CropJob, describe, model_provenance, run_job
    from nnunet_ape.nnunet.raw_dataset import check_raw_cases, new_dataset_folder, open_raw_dataset

    if args.num_processes < 1:
        raise InputError(f"--num-processes {args.num_processes}: must be at least 1")
    if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
        raise InputError(f"--part-id {args.part_id} --num-parts {args.num_parts}: need num-parts >= 1 and 0 <= part-id < num-parts")
    if margin_mm < 0:
        raise InputError(f"--margin-mm {margin_mm}: must not be negative")
    channels = check_channels(args.channels)
    source = open_raw_dataset(args.dataset, need_labels=True)
    check_raw_cases(source, MIN_VOXELS)  # every header (and float voxels) before any output: a bad case in one line
    device = str(resolve_device(args.device))
    models_args = {"localizer_path": localizer, "organs": organs, "channels": channels, "ape_path": args.model,
                   "bpr_path": args.bpr_model, "device": device}
    models = load_feature_models(**models_args)  # checks organs, channels and checkpoints before any output
    organs = models.organs
    unknown = [o for o in organs if o not in source.labels]
    if unknown:
        raise InputError(f"unknown organ '{unknown[0]}': not a label of {source.folder.name} (labels: {', '.join(k for k in source.labels if k != 'background')})")
    models_args["organs"] = organs
    name = args.name or _default_name(source.folder, organs, suffix)
    target = new_dataset_folder(args.output, name)  # whether the id is free: run_job asks, under its lock
    provenance = model_provenance(models, localizer)
    settings = {"source": str(source.folder.resolve()), "organs": organs, "channels": list(channels), "margin_mm": margin_mm,
                "keep_labels": keep_labels, "models": provenance}
    job = CropJob(source, target, organs, keep_labels, margin_mm, models_args, args.num_processes, settings,
                  args.num_parts, args.part_id)
    manifest = run_job(job, models)
    if manifest is None:
        print(f"part {args.part_id} of {args.num_parts} done; other parts still have cases to write. The last part to "
              f"finish moves the dataset to {target} (rerun any part to finish it)")
        return
    print(describe(manifest))
    print(f"-> {target}\nnext: nnUNetv2_plan_and_preprocess -d {args.output} -c 3d_fullres --verify_dataset_integrity")
