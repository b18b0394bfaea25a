"""``nnunet-ape predict``: localized nnU-Net prediction (localize, crop, segment, paste back) on CTs."""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_ape.cli.common import HelpFormatter
from nnunet_ape.errors import InputError


def add_parser(sub) -> None:
    """Register the ``predict`` command on the ``nnunet-ape`` subparsers ``sub``."""
    parser = sub.add_parser(
        "predict",
        help="segment CTs with nnU-Net models on their organ crops only (localize, crop, nnU-Net, paste back)",
        description="Predict CTs with trained nnU-Net models, each on its organ's crop: one APE (and BPR) pass per case "
        "whatever the number of organs, then nnU-Net's own predictor on each crop (its tiles, Gaussian blending, "
        "mirroring, fold ensemble), in this process. Works for models of APE configurations (nnunet-ape plan; -tr "
        "nnUNetTrainerAPECrop / APEChannels / APECropChannels), of crop-dataset / channels-dataset datasets (the "
        "localizer comes from the dataset's crops.json) and for any stock full-image model (then it is plain nnU-Net "
        "prediction). Per case: CASE.nii.gz in the input's exact geometry with the source dataset's label values (several "
        "models merged; overlaps go to the highest probability) and CASE_boxes.json (boxes used, regrowth, fallbacks, "
        "seconds per stage). Where a predicted organ touches a crop face inside the image, the crop grows there and the "
        "organ is predicted again (--max-regrow times at most). Finished cases are kept unless --overwrite.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-i", "--input", required=True, help="CT file, DICOM folder, folder of CTs, list file or nnU-Net raw "
                        "dataset (imagesTr and imagesTs); multi-channel models read CASE_0000, CASE_0001, ... beside each other")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    parser.add_argument("-d", "--dataset", required=True, help="dataset the models were trained on: id or DatasetXXX_Name in nnUNet_results")
    parser.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres"], help="one model per configuration, merged into one label map")
    parser.add_argument("-tr", "--trainers", nargs="+", help="trainer per configuration (one for all, or one each); "
                        "default: the one trainer each configuration was trained with")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (nnU-Net's -p)")
    parser.add_argument("-f", "--folds", nargs="+", help="folds to ensemble (default: every fold with the checkpoint)")
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint file name in each fold")
    parser.add_argument("-step_size", "--step-size", type=float, default=0.5, help="nnU-Net's tile step (fraction of the patch size)")
    parser.add_argument("--disable_tta", "--disable-tta", action="store_true", help="no mirroring (8x faster in 3D, nnU-Net's flag)")
    parser.add_argument("--no-gaussian", action="store_true", help="average tiles uniformly instead of nnU-Net's Gaussian weights")
    parser.add_argument("-device", "--device", default="auto", help="auto, cpu, cuda or cuda:N (nnU-Net and the APE/BPR models)")
    parser.add_argument("--save_probabilities", "--save-probabilities", action="store_true",
                        help="also write CASE.npz: probabilities (C, Z, Y, X) float16, background first, then the labels listed in it")
    parser.add_argument("--max-regrow", type=int, default=2, help="times a crop may grow where a predicted organ touches its face")
    parser.add_argument("--regrow-mm", type=float, default=20.0, help="how far a touched face moves out (at least; or 25%% of the box's extent)")
    parser.add_argument("-l", "--localizer", type=Path, help="crop models: localize with this localizer instead of the one "
                        "they were planned with (refitted on more cases, or with other margins; it must know their "
                        "organs). The models were trained on the planned localizer's crops: a tighter box relies on "
                        "regrowth where an organ reaches its face. Not for crop+channels models (their channels "
                        "come from the planned APE model)")
    parser.add_argument("--fallback-full", action="store_true", help="an organ the localizer cannot place is predicted on the "
                        "whole image (default: left empty, with a warning)")
    parser.add_argument("-num_parts", "--num-parts", type=int, default=1, help="split the cases into this many parts (SLURM arrays, several GPUs)")
    parser.add_argument("-part_id", "--part-id", type=int, default=0, help="which part this process predicts (0 .. num-parts - 1)")
    parser.add_argument("--overwrite", action="store_true", help="predict cases again whose outputs exist")
    parser.add_argument("--sequential", action="store_true", help="read, localize, predict and write one case after "
                        "the other (default: the next case is read, on CUDA also localized, and the last one written "
                        "in background threads while a case predicts, as nnUNetv2_predict overlaps them)")
    parser.set_defaults(func=_run)


def _trainers_for(args, results_root: Path) -> list[str]:
    if args.trainers:
        if len(args.trainers) not in (1, len(args.configurations)):
            raise InputError(f"-tr: give one trainer, or one per configuration ({len(args.configurations)})")
        return args.trainers * len(args.configurations) if len(args.trainers) == 1 else args.trainers
    trainers = []
    for configuration in args.configurations:
        found = sorted(p.name.split("__")[0] for p in results_root.glob(f"*__{args.plans}__{configuration}") if p.is_dir())
        if len(found) != 1:
            raise InputError(f"-c {configuration}: {'no model trained' if not found else 'trained with ' + ', '.join(found)} "
                             f"in {results_root}; choose the trainer with -tr")
        trainers.append(found[0])
    return trainers


def with_localizer(models: list, localizer: Path) -> None:
    """Point every crop model of ``models`` (TrainedModel) at ``localizer`` (its own APE/BPR checkpoints);
    InputError when the file is missing, no model crops, or a model crops with channels."""
    from nnunet_ape.nnunet.trained_model import CROP, CROP_CHANNELS

    if not Path(localizer).is_file():
        raise InputError(f"-l {localizer}: no such localizer file; write one with 'nnunet-ape localize fit'")
    if any(m.kind == CROP_CHANNELS for m in models):
        raise InputError("-l: a crop+channels model's channels come from the APE model it was planned with; predict it "
                         "with its own localizer (drop -l)")
    crop = [m for m in models if m.kind == CROP]
    if not crop:
        raise InputError("-l: none of the models crops (-l replaces the localizer of crop models only)")
    for model in crop:
        model.feature_args = {**model.feature_args, "localizer_path": Path(localizer), "ape_path": None, "bpr_path": None}


def _run(args) -> None:
    from nnunet_ape.distributed import resolve_device
    from nnunet_ape.inputs import resolve_images
    from nnunet_ape.nnunet.localized_predict import LocalizedPredictor, PredictOptions, predict_files
    from nnunet_ape.nnunet.trained_model import PredictorOptions, dataset_results, open_model, results_folder

    if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
        raise InputError(f"--part-id {args.part_id} --num-parts {args.num_parts}: need num-parts >= 1 and 0 <= part-id < num-parts")
    if not 0 < args.step_size <= 1:
        raise InputError(f"-step_size {args.step_size}: must be in (0, 1]")
    if args.max_regrow < 0 or args.regrow_mm < 0:
        raise InputError("--max-regrow and --regrow-mm must not be negative")
    images = resolve_images(args.input)
    trainers = _trainers_for(args, dataset_results(args.dataset))
    device = str(resolve_device(args.device))
    options = PredictorOptions(args.step_size, not args.no_gaussian, not args.disable_tta, device)
    models = [open_model(results_folder(args.dataset, tr, args.plans, c), args.folds, args.checkpoint, options)
              for c, tr in zip(args.configurations, trainers)]
    if args.localizer is not None:
        with_localizer(models, args.localizer)
    predictor = LocalizedPredictor(models, device, PredictOptions(args.max_regrow, args.regrow_mm, 0.25, args.fallback_full,
                                                                  args.save_probabilities, args.overwrite,
                                                                  background_io=not args.sequential))
    counts = predict_files(predictor, images, args.output, args.num_parts, args.part_id)
    kinds = ", ".join(f"{m.name.split('__')[-1]} ({m.kind})" for m in models)
    part = f" (part {args.part_id} of {args.num_parts}: {counts['part_cases']} of {counts['all_cases']} cases)" if args.num_parts > 1 else ""
    print(f"{counts['predicted']} case(s) predicted, {counts['skipped']} already done{part} with {kinds} -> {args.output}")
