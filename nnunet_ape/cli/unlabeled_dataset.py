"""``nnunet-ape unlabeled-dataset``: unlabeled CTs as an nnU-Net raw dataset for ``nnUNetTrainerAPEPretrain``."""

from __future__ import annotations

import argparse

from nnunet_ape.cli.common import HelpFormatter


def add_parser(sub) -> None:
    """Register the ``unlabeled-dataset`` command on the ``nnunet-ape`` subparsers ``sub``."""
    parser = sub.add_parser(
        "unlabeled-dataset",
        help="unlabeled CTs as an nnU-Net raw dataset (body labels), for APE pretraining inside nnU-Net",
        description="nnU-Net plans and preprocesses only labeled datasets. This writes $nnUNet_raw/DatasetXXX_NAME with "
        "each CT in imagesTr and its body (largest component above -500 HU, holes filled per slice) as the one label, "
        "so that nnUNetv2_plan_and_preprocess and nnUNetv2_train -tr nnUNetTrainerAPEPretrain run on it (the trainer "
        "ignores labels; the body label also gives nnU-Net's CT normalization a window over the whole body). NIfTI "
        "inputs are linked, other formats converted. A rerun after a crash skips the cases already written.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-i", "--input", nargs="+", required=True,
                        help="CT file(s), folder(s), DICOM series folder(s), list file(s) or nnU-Net raw dataset(s) "
                        "(their imagesTr and imagesTs)")
    parser.add_argument("-o", "--output", type=int, required=True, help="id of the new dataset (3 digits, unused)")
    parser.add_argument("--name", default="UnlabeledCT", help="name of the new dataset: DatasetXXX_NAME")
    parser.set_defaults(func=_run)


def _run(args) -> None:
    from nnunet_ape.input_checks import check_cases
    from nnunet_ape.inputs import resolve_images
    from nnunet_ape.nnunet.unlabeled_dataset import MIN_SIZE, build_unlabeled_dataset, case_names

    images = [image for spec in args.input for image in resolve_images(spec)]
    check_cases([(name, [image], None) for image, name in zip(images, case_names(images))], MIN_SIZE)  # before any output
    folder = build_unlabeled_dataset(images, args.output, args.name)
    print(f"{len(images)} CT(s) -> {folder}; next: nnUNetv2_plan_and_preprocess -d {args.output} -c 3d_fullres "
          f"&& nnUNetv2_train {args.output} 3d_fullres all -tr nnUNetTrainerAPEPretrain")
