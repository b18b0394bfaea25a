"""``nnunet-ape`` command line: ``demo``, ``pretrain ape``, ``embed``. Each subcommand has ``--help``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnunet_ape.errors import InputError


def _triple(kind):
    def parse(text: str):
        parts = text.replace("x", ",").split(",")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"expected three numbers like 1.5,1.5,2.25, got {text!r}")
        return tuple(kind(p) for p in parts)

    return parse


def _add_pretrain_ape(sub) -> None:
    from nnunet_ape.pretrain.batches import VARIANTS
    from nnunet_ape.models.ape import PRESETS

    p = sub.add_parser(
        "ape",
        help="self-supervised APE pretraining on unlabeled CT",
        description="Pretrain an Anatomical Positional Embedding model on unlabeled CT (labels are ignored). "
        "Defaults follow the paper: AdamW lr 3e-4, weight decay 1e-6, clipping 1.0, n=8 view pairs, N=8000 voxel "
        "pairs, 150k iterations. Launch with 'torchrun --nproc_per_node G nnunet-ape pretrain ape ...' for data-parallel.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("-i", "--input", required=True, help="folder of CT files (NIfTI, NRRD, MHA, DICOM folders), a list file (one path per line), or an nnU-Net raw dataset (id, name or folder)")
    p.add_argument("-o", "--output", required=True, type=Path, help="run folder: checkpoints, log.csv, loss.png, cache/")
    p.add_argument("--variant", choices=VARIANTS, default="equiv", help="naive: single views; aug: pairs of augmented overlapping views; equiv: aug + equivariance loss")
    p.add_argument("--equiv-weight", type=float, default=1.0, help="lambda of the equivariance loss (variant equiv)")
    p.add_argument("--iterations", type=int, default=150_000, help="total training iterations (batches)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (constant)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant", help="constant (the paper) or cosine decay to 0 at --iterations (better for short runs)")
    p.add_argument("--weight-decay", type=float, default=1e-6, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument("--pairs", type=int, default=8, help="n: views (naive) or view pairs per batch, all from one CT")
    p.add_argument("--voxels", type=int, default=8000, help="N: voxels (pairs) per batch, split evenly over the n views")
    p.add_argument("--patch-volume", type=int, default=96 * 96 * 64, help="voxels per view; the shape is random with aspect ratio <= 2")
    p.add_argument("--model", choices=sorted(PRESETS), default="base", help="network size: tiny (tests, demo), small, base (real use)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--workers", type=int, default=4, help="background data-loading processes per GPU/process")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="iterations between checkpoints (a killed run loses at most this many)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this many minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint_last.pt (optimizer, iteration count, log)")
    p.set_defaults(func=_run_pretrain_ape)


def _run_pretrain_ape(args) -> None:
    from nnunet_ape.inputs import resolve_images
    from nnunet_ape.pretrain.batches import BatchConfig
    from nnunet_ape.pretrain.train_ape import PretrainConfig, pretrain_ape

    images = resolve_images(args.input)
    cfg = PretrainConfig(
        equiv_weight=args.equiv_weight,
        iterations=args.iterations,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        model=args.model,
        batch=BatchConfig(variant=args.variant, pairs=args.pairs, voxels=args.voxels, patch_volume=args.patch_volume),
        device=args.device,
        amp=not args.no_amp,
        workers=args.workers,
        checkpoint_every=args.checkpoint_every,
        max_minutes=args.max_minutes,
        seed=args.seed,
    )
    final = pretrain_ape(images, args.output, cfg, resume=args.resume)
    print(f"model: {final}")


def _add_embed(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="APE map of whole CT volumes (3-component NIfTI in the input's geometry)",
        description="Embed CTs patch-wise with overlapping, Gaussian-blended windows. The output overlays the input "
        "exactly (same size, spacing, origin, direction) unless --stride 4 is given (every 4th voxel, spacing x4).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("-m", "--model", required=True, type=Path, help="checkpoint written by 'nnunet-ape pretrain ape'")
    p.add_argument("-i", "--input", required=True, help="CT file, DICOM folder, folder of CTs, list file or nnU-Net raw dataset")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder (CASE_ape.nii.gz per case), or a file name for a single input")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--float16", action="store_true", help="store the map as float16 (half the size)")
    p.add_argument("--stride", type=int, choices=(1, 4), default=1, help="4: store every 4th voxel only (for storage)")
    p.add_argument("--spacing", type=_triple(float), default=None, help="mm the CT is resampled to for the network, e.g. 1.5,1.5,2.25 (default: the checkpoint's)")
    p.add_argument("--patch-size", type=_triple(int), default=None, help="window in voxels at that spacing (default: the checkpoint's)")
    p.add_argument("--overlap", type=float, default=0.5, help="overlap of neighbouring windows (0-0.9)")
    p.add_argument("--batch-size", type=int, default=2, help="windows per forward pass")
    p.add_argument("--png", action="store_true", help="also write CASE_ape.png: the three channels as RGB over the CT in three planes")
    p.set_defaults(func=_run_embed)


def _run_embed(args) -> None:
    from nnunet_ape.checkpoint import load_checkpoint
    from nnunet_ape.distributed import resolve_device
    from nnunet_ape.embed import EmbedSettings
    from nnunet_ape.embed_files import embed_files
    from nnunet_ape.inputs import resolve_images

    if not 0 <= args.overlap < 0.95:
        raise InputError(f"--overlap {args.overlap}: must be in [0, 0.95)")
    images = resolve_images(args.input)
    defaults = load_checkpoint(args.model).get("embed", {})
    settings = EmbedSettings(
        spacing=args.spacing or tuple(defaults.get("spacing", EmbedSettings.spacing)),
        patch_size=args.patch_size or tuple(defaults.get("patch_size", EmbedSettings.patch_size)),
        overlap=args.overlap,
        batch_size=args.batch_size,
        stride=args.stride,
        half=args.float16,
    )
    embed_files(args.model, images, args.output, settings, str(resolve_device(args.device)), png=args.png)


def _add_localize(sub) -> None:
    loc = sub.add_parser("localize", help="few-shot organ boxes from APE maps (fit, predict)",
                         description="Few-shot organ localization: fit a localizer on K labeled cases, predict boxes.")
    loc_sub = loc.add_subparsers(dest="localize_command", required=True, metavar="STEP")
    fit = loc_sub.add_parser(
        "fit",
        help="fit a localizer on K labeled cases",
        description="Embed K labeled cases, take the 6 edge points of each organ's mask as queries (the paper's method) "
        "and calibrate each organ's box enlargement by leave-one-shot-out so that the crop keeps --target-recall of the "
        "organ. Writes a human-readable JSON localizer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    fit.add_argument("-m", "--model", required=True, type=Path, help="APE checkpoint")
    fit.add_argument("-d", "--dataset", help="nnU-Net raw dataset (folder, name or id): imagesTr + labelsTr + dataset.json")
    fit.add_argument("--images", type=Path, help="folder of CTs (instead of -d)")
    fit.add_argument("--labels", type=Path, help="folder of label maps named like the CTs (with --images)")
    fit.add_argument("--label-names", type=Path, help="JSON naming the label values ({name: value} or {value: name}), with --images")
    fit.add_argument("--organs", nargs="+", help="organ names (or label values); default: every labeled organ")
    fit.add_argument("--shots", type=int, default=5, help="K: number of labeled cases used (the first K)")
    fit.add_argument("--target-recall", type=float, default=0.99, help="fraction of each organ the enlarged box must keep")
    fit.add_argument("--combine", choices=("mean", "median"), default="mean", help="combine per-shot boxes: mean (paper) or median (robust)")
    fit.add_argument("--device", default="auto")
    fit.add_argument("-o", "--output", required=True, type=Path, help="localizer JSON to write")
    fit.set_defaults(func=_run_localize_fit)
    pred = loc_sub.add_parser(
        "predict",
        help="predict organ boxes with a localizer",
        description="Embed each CT and write CASE_boxes.json: per organ the retrieved box and the enlarged crop box, "
        "in voxel indices (x, y, z of the input file) and in mm (LPS).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    pred.add_argument("-l", "--localizer", required=True, type=Path, help="JSON written by 'localize fit'")
    pred.add_argument("-i", "--input", required=True, help="CT file, DICOM folder, folder of CTs, list file or nnU-Net raw dataset")
    pred.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    pred.add_argument("-m", "--model", type=Path, help="APE checkpoint, if it moved since fitting")
    pred.add_argument("--organs", nargs="+", help="subset of the localizer's organs")
    pred.add_argument("--png", action="store_true", help="also write CASE_boxes.png with the boxes drawn on the CT")
    pred.add_argument("--device", default="auto")
    pred.set_defaults(func=_run_localize_predict)


def _run_localize_fit(args) -> None:
    from nnunet_ape.distributed import resolve_device
    from nnunet_ape.localize.cases import resolve_organs
    from nnunet_ape.localize.localizer import fit_localizer, save_localizer

    cases = _labeled_cases(args)
    if args.shots < 1:
        raise InputError(f"--shots {args.shots}: at least one labeled case is needed")
    if len(cases) < args.shots:
        raise InputError(f"--shots {args.shots}: only {len(cases)} labeled cases available")
    if not 0 < args.target_recall <= 1:
        raise InputError(f"--target-recall {args.target_recall}: must be in (0, 1]")
    organs = resolve_organs(args.organs, cases[0].labels)
    localizer = fit_localizer(cases[: args.shots], organs, args.model, str(resolve_device(args.device)), args.target_recall, args.combine)
    save_localizer(localizer, args.output)
    alphas = ", ".join(f"{o} {e['alpha']:.2f}" for o, e in localizer["organs"].items())
    print(f"localizer for {len(organs)} organ(s) from {args.shots} shot(s) -> {args.output}; alpha: {alphas}")


def _run_localize_predict(args) -> None:
    import json

    from nnunet_ape.atomic import atomic_path
    from nnunet_ape.distributed import resolve_device
    from nnunet_ape.inputs import resolve_images
    from nnunet_ape.io import output_name, read_volume
    from nnunet_ape.localize.localizer import load_localizer, localize_volume
    from nnunet_ape.plots import boxes_png

    localizer, checkpoint = load_localizer(args.localizer, args.model)
    unknown = [o for o in args.organs or [] if o not in localizer["organs"]]
    if unknown:
        raise InputError(f"unknown organ '{unknown[0]}'; this localizer knows: {', '.join(localizer['organs'])}")
    images = resolve_images(args.input)
    device = str(resolve_device(args.device))
    for image in images:
        ct = read_volume(image, min_size=8)
        boxes, _ = localize_volume(localizer, checkpoint, ct, device, args.organs)
        name = output_name(image)
        result = {"image": str(image), "shape": list(ct.shape), "spacing": list(ct.spacing), "organs": boxes}
        with atomic_path(args.output / f"{name}_boxes.json") as tmp:
            Path(tmp).write_text(json.dumps(result, indent=1))
        if args.png:
            boxes_png(ct, boxes, args.output / f"{name}_boxes.png", title=f"{image.name}: organ boxes")
        print(f"{image} -> {args.output / (name + '_boxes.json')}")


def _add_evaluate(sub) -> None:
    ev = sub.add_parser("evaluate", help="evaluation protocols (localization)", description="Evaluation protocols.")
    ev_sub = ev.add_subparsers(dest="evaluate_command", required=True, metavar="WHAT")
    p = ev_sub.add_parser(
        "localization",
        help="the paper's k-shot localization protocol with a body-box baseline",
        description="Cross-validated k-shot localization on labeled cases: landmark retrieval errors (MRE_c, MRE_ep), "
        "box IoU, VR@99, and recall/volume ratio with the shot-calibrated alpha; APE against a baseline that places each "
        "organ at its average fraction of the body's bounding box, measured in the same run. Writes OUT/localization.md "
        "and OUT/localization.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("-m", "--model", required=True, type=Path, help="APE checkpoint")
    p.add_argument("-d", "--dataset", help="nnU-Net raw dataset (folder, name or id)")
    p.add_argument("--images", type=Path, help="folder of CTs (instead of -d)")
    p.add_argument("--labels", type=Path, help="folder of label maps named like the CTs")
    p.add_argument("--label-names", type=Path, help="JSON naming the label values")
    p.add_argument("--organs", nargs="+", help="organ names (or label values); default: every labeled organ")
    p.add_argument("--shots", type=int, default=5, help="k: labeled cases per fold")
    p.add_argument("--target-recall", type=float, default=0.99)
    p.add_argument("--combine", choices=("mean", "median"), default="mean")
    p.add_argument("--device", default="auto")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.set_defaults(func=_run_evaluate_localization)


def _labeled_cases(args):
    from nnunet_ape.localize.cases import cases_from_folders, cases_from_nnunet, read_label_names

    if args.dataset:
        return cases_from_nnunet(args.dataset)
    if args.images and args.labels:
        return cases_from_folders(args.images, args.labels, read_label_names(args.label_names) if args.label_names else None)
    raise InputError("give the labeled cases with -d DATASET or with --images DIR --labels DIR")


def _run_evaluate_localization(args) -> None:
    import json

    from nnunet_ape.atomic import atomic_path
    from nnunet_ape.checkpoint import load_ape_model
    from nnunet_ape.distributed import resolve_device
    from nnunet_ape.localize.cases import resolve_organs
    from nnunet_ape.localize.evaluate import evaluate_localization, markdown_tables
    from nnunet_ape.localize.localizer import embed_settings_for

    cases = _labeled_cases(args)
    if len(cases) <= args.shots:
        raise InputError(f"--shots {args.shots}: needs more labeled cases than shots, {len(cases)} given")
    organs = resolve_organs(args.organs, cases[0].labels)
    model, _ = load_ape_model(args.model)
    result = evaluate_localization(cases, organs, model, embed_settings_for(args.model), args.shots,
                                   str(resolve_device(args.device)), args.target_recall, args.combine)
    table = markdown_tables(result)
    with atomic_path(args.output / "localization.json") as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1))
    with atomic_path(args.output / "localization.md") as tmp:
        Path(tmp).write_text(table)
    print(table)


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="end-to-end run on built-in synthetic CT phantoms (no data needed)",
        description="Generate a small synthetic CT cohort, pretrain a tiny APE model on it for a few minutes, embed a "
        "held-out phantom and write an overlay PNG and a report.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("-o", "--output", type=Path, default=Path("nnunet_ape_demo"), help="demo folder (must not exist yet, unless --resume)")
    p.add_argument("--cases", type=int, default=12, help="phantoms to pretrain on (one more is held out)")
    p.add_argument("--minutes", type=float, default=3.0, help="pretraining time budget")
    p.add_argument("--model", default="tiny", choices=("tiny", "small", "base"), help="network size (tiny trains fastest on a CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=2, help="background data-loading processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in the same folder")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> None:
    from nnunet_ape.demo import run_demo

    run_demo(args.output, args.cases, args.minutes, args.model, args.device, args.workers, args.seed, args.resume)


def build_parser() -> argparse.ArgumentParser:
    """The ``nnunet-ape`` argument parser with all subcommands."""
    parser = argparse.ArgumentParser(
        prog="nnunet-ape",
        description="Anatomical Positional Embeddings for nnU-Net v2: pretrain, embed, (soon) localize and segment CT.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    pretrain = sub.add_parser("pretrain", help="self-supervised pretraining (ape)", description="Self-supervised pretraining.")
    pretrain_sub = pretrain.add_subparsers(dest="model_kind", required=True, metavar="MODEL")
    _add_pretrain_ape(pretrain_sub)
    _add_embed(sub)
    _add_localize(sub)
    _add_evaluate(sub)
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
