"""``nnunet-ape trainers-path``: the folder to put in ``nnUNet_extTrainer`` so nnU-Net finds the APE trainers."""

from __future__ import annotations

from pathlib import Path

from nnunet_ape.errors import InputError

SHIM = "nnunet_ape_trainers.py"


def trainers_folder() -> Path:
    """The repository's ``trainers/`` folder (its module only re-exports ``nnunet_ape.nnunet.trainers``)."""
    folder = Path(__file__).resolve().parents[2] / "trainers"
    if not (folder / SHIM).is_file():
        raise InputError(f"{folder / SHIM} not found: install nnunet-ape from its repository with 'pip install -e .'")
    return folder


def add_parser(sub) -> None:
    """Register the ``trainers-path`` command on the ``nnunet-ape`` subparsers ``sub``."""
    parser = sub.add_parser(
        "trainers-path",
        help="print the folder for nnUNet_extTrainer (export nnUNet_extTrainer=$(nnunet-ape trainers-path))",
        description="Print the folder that nnU-Net's nnUNet_extTrainer must name so that nnUNetv2_train -tr "
        "nnUNetTrainerAPECrop / APEChannels / APECropChannels finds the trainers. Append it to an existing value with "
        "':' to keep other trainer folders.",
    )
    parser.set_defaults(func=lambda args: print(trainers_folder()))
