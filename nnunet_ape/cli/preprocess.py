"""``nnunet-ape preprocess``: preprocess APE configurations (organ crops, embedding channels) for nnU-Net training."""

from __future__ import annotations

import argparse

from nnunet_ape.cli.common import HelpFormatter


def add_parser(sub) -> None:
    """Register the ``preprocess`` command on the ``nnunet-ape`` subparsers ``sub``."""
    parser = sub.add_parser(
        "preprocess",
        help="preprocess APE configurations added by 'nnunet-ape plan' (nnUNetv2_preprocess cannot run them)",
        description="nnU-Net's preprocessing of the training cases for APE configurations: per case one APE (and BPR) "
        "pass on the whole CT gives the organ boxes and/or the embedding channels of all the configurations given "
        "together (e.g. one crop configuration per organ group); boxes are found on the APE map at the model's own "
        "spacing, only APE channels resample it onto every voxel; training boxes are grown to hold the "
        "whole label plus the margin; then nnU-Net's own steps (nonzero crop, normalization, resampling). Writes "
        "nnU-Net's files into $nnUNet_preprocessed/DatasetXXX/<data_identifier> and the full label maps into "
        "gt_segmentations; for crops, nnU-Net's planner then plans patch size, batch size and network for the crops' "
        "median shape. A killed run skips the cases it finished when started again.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-d", "--dataset", required=True, help="dataset id, DatasetXXX_Name or its nnUNet_preprocessed folder")
    parser.add_argument("-c", "--configurations", nargs="+", required=True, help="APE configurations (from 'nnunet-ape plan')")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (nnU-Net's -p)")
    parser.add_argument("-np", "--num-processes", type=int, default=None,
                        help="cases processed in parallel; default: nnU-Net's default ($nnUNet_def_n_proc, else 8), at most "
                        "the CPU cores and at most 4, because each process loads its own models and holds a whole CT (GBs "
                        "for a 512x512x300 CT). With a GPU at most 2, and 1 where the free GPU memory holds only one (each "
                        "process has its own CUDA context and models, about 4 GB): a larger -np is lowered, with a note")
    parser.add_argument("--device", default="auto", help="where the APE/BPR models run: auto, cpu, cuda or cuda:N")
    parser.set_defaults(func=_run)


def _run(args) -> None:
    from nnunet_ape.distributed import resolve_device
    from nnunet_ape.errors import InputError
    from nnunet_ape.inputs import find_nnunet_raw_dataset
    from nnunet_ape.locks import plans_lock
    from nnunet_ape.nnunet.ape_plans import preprocessed_dataset, read_plans, resolved_configuration, settings_of
    from nnunet_ape.nnunet.preprocess_runner import PreprocessJob, describe_run, num_processes, preprocess_configurations

    if args.num_processes is not None and args.num_processes < 1:
        raise InputError(f"-np {args.num_processes}: must be at least 1")
    preprocessed = preprocessed_dataset(args.dataset)
    raw = find_nnunet_raw_dataset(preprocessed.name)
    if raw is None:
        raise InputError(f"{preprocessed.name}: its raw dataset is not in nnUNet_raw")
    device = str(resolve_device(args.device))
    processes, note = num_processes(device, args.num_processes)
    if note:
        print(note)
    configurations = list(dict.fromkeys(args.configurations))
    jobs = [PreprocessJob(preprocessed, raw, args.plans, c, processes, device) for c in configurations]
    with plans_lock(preprocessed, args.plans, f"preprocess -d {args.dataset}"):  # one job per plans at a time
        summaries = preprocess_configurations(jobs)
    for configuration, summary in zip(configurations, summaries):
        print(describe_run(configuration, summary))
    settings = settings_of(resolved_configuration(read_plans(preprocessed, args.plans), configurations[0]))
    print(f"next: nnUNetv2_train {preprocessed.name[7:10]} {configurations[0]} 0 -tr {settings.trainer} "
          f"(with nnUNet_extTrainer=$(nnunet-ape trainers-path))")
