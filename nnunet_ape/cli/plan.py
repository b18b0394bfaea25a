"""``nnunet-ape plan``: add APE configurations (organ crops and/or embedding channels) to a dataset's nnU-Net plans."""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_ape.cli.common import HelpFormatter, add_channel_args
from nnunet_ape.errors import InputError

DEFAULT_MARGIN_MM = 10.0  # = nnunet_ape.nnunet.crop_dataset.DEFAULT_MARGIN_MM; not imported, so --help needs no torch


def add_parser(sub) -> None:
    """Register the ``plan`` command on the ``nnunet-ape`` subparsers ``sub``."""
    parser = sub.add_parser(
        "plan",
        help="add APE configurations (organ crops, embedding channels) to a planned nnU-Net dataset",
        description="Add configurations to the plans of a dataset that nnUNetv2_plan_and_preprocess (or "
        "nnUNetv2_plan_experiment) has planned, inheriting from -c. With -l: one crop configuration per organ "
        "(CONFIG_ape_ORGAN; --union: one for all organs together), trained with -tr nnUNetTrainerAPECrop. With "
        "--channels: embedding input channels (CONFIG_ape, CONFIG_ape_bpr; -tr nnUNetTrainerAPEChannels); both "
        "together: crops with channels (CONFIG_ape_ORGAN_ape; -tr nnUNetTrainerAPECropChannels). Other "
        "configurations are left untouched and the old plans file is kept as PLANS.json.bak-TIMESTAMP. Then run "
        "'nnunet-ape preprocess' for the new configurations (it also plans the crops' patch size).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-d", "--dataset", required=True, help="dataset id, DatasetXXX_Name or its nnUNet_preprocessed folder")
    parser.add_argument("-c", "--configuration", default="3d_fullres", help="planned configuration to build on")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (nnU-Net's -p)")
    parser.add_argument("-l", "--localizer", type=Path, help="localizer JSON from 'nnunet-ape localize fit': adds organ-crop configurations")
    parser.add_argument("--organs", nargs="+", help="organs to crop for (dataset.json label names); default: the localizer's")
    parser.add_argument("--union", action="store_true", help="one configuration cropping to the union box of all --organs, instead of one per organ")
    add_channel_args(parser)
    parser.add_argument("--channel-precision", choices=("float32", "float16"), default="float32",
                        help="float16: store the embedding channels rounded to float16 values (relative error <= 0.05%%), "
                        "which halves their preprocessed size on disk (nnU-Net still reads float32; the CT is untouched); "
                        "the configurations get '_fp16' appended to their names")
    parser.add_argument("--margin-mm", type=float, default=DEFAULT_MARGIN_MM, help="how far a training case's box reaches beyond its label")
    parser.add_argument("--overwrite", action="store_true", help="replace configurations of the same name that have other settings")
    parser.set_defaults(func=_run)


def _run(args) -> None:
    import json

    from nnunet_ape.case_features import check_channels, load_feature_models
    from nnunet_ape.locks import plans_lock
    from nnunet_ape.nnunet.ape_plans import (APESettings, add_configurations, base_configuration, configuration_name,
                                              preprocessed_dataset, read_plans)
    from nnunet_ape.nnunet.crop_dataset import model_provenance

    if args.localizer is None and not args.channels:
        raise InputError("give -l LOCALIZER (organ crops) and/or --channels ape bpr (embedding inputs)")
    if args.margin_mm < 0:
        raise InputError(f"--margin-mm {args.margin_mm}: must not be negative")
    if args.channel_precision != "float32" and not args.channels:
        raise InputError(f"--channel-precision {args.channel_precision} applies to embedding channels; add --channels")
    channels = check_channels(args.channels)
    preprocessed = preprocessed_dataset(args.dataset)
    plans = read_plans(preprocessed, args.plans)
    if args.configuration not in plans["configurations"]:
        raise InputError(f"-c {args.configuration}: not in {args.plans}.json (it has: {', '.join(plans['configurations'])})")
    base_configuration(plans, args.configuration)  # refuses cascade stages before any model loads
    labels = json.loads((preprocessed / "dataset.json").read_text())["labels"]
    if any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise InputError(f"{preprocessed.name}: region-based labels are not supported by APE configurations")
    models = load_feature_models(args.localizer, args.organs, channels, args.model, args.bpr_model)  # checks organs, checkpoints
    unknown = [o for o in models.organs if o not in labels]
    if unknown:
        raise InputError(f"unknown organ '{unknown[0]}': not a label of {preprocessed.name} (labels: "
                         f"{', '.join(k for k in labels if k != 'background')})")
    provenance = model_provenance(models, args.localizer)
    groups = ([models.organs] if args.union else [[o] for o in models.organs]) if args.localizer else [[]]
    entries = {configuration_name(args.configuration, g, list(channels), args.channel_precision):
               APESettings(args.configuration, g, {o: int(labels[o]) for o in g}, list(channels), args.margin_mm, provenance,
                           channel_precision=args.channel_precision)
               for g in groups}
    with plans_lock(preprocessed, args.plans, f"plan -d {args.dataset}"):  # not while preprocess reads or re-plans them
        changed, backup = add_configurations(preprocessed, args.plans, entries, args.overwrite)
    for name, settings in entries.items():
        state = "added" if name in changed else "unchanged (same settings)"
        print(f"{name}: {settings.kind}, {state}; train with -tr {settings.trainer}")
    if backup:
        print(f"previous plans kept as {backup}")
    dataset_id = preprocessed.name[len("Dataset"):len("Dataset") + 3]
    print(f"next: nnunet-ape preprocess -d {dataset_id} -c {' '.join(entries)}")
