"""``nnunet-ape localize fit`` / ``predict``: few-shot organ boxes."""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_ape.cli.common import HelpFormatter, add_labeled_case_args, labeled_cases
from nnunet_ape.errors import InputError
from nnunet_ape.localize.choice import CANDIDATES
from nnunet_ape.localize.margins import ENLARGEMENTS


def add_parser(sub) -> None:
    """Register the ``localize`` command on the ``nnunet-ape`` subparsers ``sub``."""
    loc = sub.add_parser("localize", help="few-shot organ boxes from APE maps and/or BPR slice scores (fit, predict)",
                         description="Few-shot organ localization: fit a localizer on K labeled cases, predict boxes.")
    loc_sub = loc.add_subparsers(dest="localize_command", required=True, metavar="STEP")
    fit = loc_sub.add_parser(
        "fit",
        help="fit a localizer on K labeled cases",
        description="Fit on K labeled cases. With an APE checkpoint (-m): the 6 edge points of each organ's mask are the "
        "queries (--ape-boxes edge-points, the paper's method); or every voxel of the shots, labeled organ or background, is "
        "a sample in embedding space, and a test voxel belongs to an organ when enough of its nearest samples do "
        "(all-voxels; falls back to the edge points for an organ it does not find; measured against edge points by "
        "'nnunet-ape evaluate localization'). Each organ's box grows into its crop by face margins in mm (--enlargement), "
        "calibrated leave-one-shot-out so that the crop keeps --target-recall of the organ. With a BPR checkpoint (--bpr-model): each organ's slice-score interval and "
        "a z margin calibrated the same way (boxes crop along z only). Always: the organ's average place in the body's "
        "bounding box (no model needed). Per organ, every method (body box, APE, BPR z, APE or body box x/y with BPR z) "
        "is measured leave-one-shot-out, and the model's own method (APE all voxels, else APE 6 points, else BPR z) is "
        "chosen when it kept as much of the held-out shots' organs as the body box in crops no larger; else the body box. "
        "A case whose label map does not contour an organ is no shot for that organ. Writes a human-readable JSON localizer.",
        formatter_class=HelpFormatter,
    )
    add_labeled_case_args(fit, "K: shots per organ, the first K cases that contour it")
    fit.add_argument("-o", "--output", required=True, type=Path, help="localizer JSON to write")
    fit.add_argument("--ape-boxes", choices=("edge-points", "all-voxels"), default="edge-points",
                     help="how APE finds an organ: the paper's 6 edge points, or label transfer from all shot voxels")
    fit.add_argument("--method", default="auto", choices=("auto", *CANDIDATES),
                     help="auto: each organ's method chosen leave-one-shot-out on its shots; or one method for every organ")
    fit.add_argument("--enlargement", default="margins", choices=ENLARGEMENTS,
                     help="how a box becomes a crop: margins (each face grown by millimetres, shaped by where the held-out "
                     "shots missed; with 2+ shots) or alpha (the paper: every side scaled about the box's centre). Both "
                     "are calibrated to --target-recall and stored; this one is used")
    fit.set_defaults(func=_run_localize_fit)
    pred = loc_sub.add_parser(
        "predict",
        help="predict organ boxes with a localizer",
        description="Embed and/or score each CT and write CASE_boxes.json: per organ the APE box and its enlargement, the "
        "BPR z-range box, and crop_box (the one to crop with), in voxel indices (x, y, z of the input file) and in mm (LPS).",
        formatter_class=HelpFormatter,
    )
    pred.add_argument("-l", "--localizer", required=True, type=Path, help="JSON written by 'localize fit'")
    pred.add_argument("-i", "--input", required=True, help="CT file, DICOM folder, folder of CTs, list file or nnU-Net raw dataset")
    pred.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    pred.add_argument("-m", "--model", type=Path, help="APE checkpoint, if it moved since fitting")
    pred.add_argument("--bpr-model", type=Path, help="BPR checkpoint, if it moved since fitting")
    pred.add_argument("--organs", nargs="+", help="subset of the localizer's organs")
    pred.add_argument("--png", action="store_true", help="also write CASE_boxes.png with the boxes drawn on the CT")
    pred.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    pred.add_argument("--overwrite", action="store_true", help="redo cases whose CASE_boxes.json exists (default: keep "
                      "them, so a restarted job skips the cases it finished)")
    pred.set_defaults(func=_run_localize_predict)


def _run_localize_fit(args) -> None:
    import sys

    from nnunet_ape.distributed import resolve_device
    from nnunet_ape.cases import resolve_organs
    from nnunet_ape.localize.fit import fit_localizer
    from nnunet_ape.localize.localizer import save_localizer

    cases = labeled_cases(args)
    if args.shots < 1:
        raise InputError(f"--shots {args.shots}: at least one labeled case is needed")
    if len(cases) < args.shots:
        raise InputError(f"--shots {args.shots}: only {len(cases)} labeled cases available")
    if not 0 < args.target_recall <= 1:
        raise InputError(f"--target-recall {args.target_recall}: must be in (0, 1]")
    organs = resolve_organs(args.organs, cases[0].labels)
    localizer = fit_localizer(cases, organs, args.model, str(resolve_device(args.device)), args.target_recall,
                              args.combine, args.bpr_model, args.ape_boxes, shots=args.shots, method=args.method,
                              enlargement=args.enlargement)
    save_localizer(localizer, args.output)
    for note in localizer["warnings"]:
        print(f"nnunet-ape: warning: {note}", file=sys.stderr)
    print(f"{localizer['method']} localizer for {len(organs)} organ(s) from {len(localizer['shots'])} case(s) -> {args.output}")
    for organ, e in localizer["organs"].items():
        chosen = e["selection"][e["method"]] if e["selection"] else None
        why = (f"held-out recall {chosen['recall_min']:.3f} (min), crop {100 * chosen['crop_fraction']:.1f}% of the image"
               if chosen else "one shot: nothing to hold out, so no choice")
        why = why if args.method == "auto" else f"--method; {why}"
        cover = f"; covers about {100 * e['coverage']:.1f}% of new cases" if e.get("coverage") else ""
        print(f"  {organ}: {len(e['shot_cases'])} shot(s), method {e['method']} ({why}{cover})")
    if any(e.get("alpha_calibrated") is False for e in localizer["organs"].values()):
        print("nnunet-ape: warning: alpha is the uncalibrated default: calibration holds out one shot at a time and needs "
              "at least 2 shots (--shots 2 or more)", file=sys.stderr)


def _run_localize_predict(args) -> None:
    import json

    from tqdm import tqdm

    from nnunet_ape.atomic import atomic_path
    from nnunet_ape.distributed import resolve_device
    from nnunet_ape.inputs import resolve_images
    from nnunet_ape.io import output_name, read_volume
    from nnunet_ape.bpr.scoring import load_bpr_model
    from nnunet_ape.canonical import canonical_ct
    from nnunet_ape.checkpoint import load_ape_model
    from nnunet_ape.embed_files import MIN_VOXELS, check_header
    from nnunet_ape.input_checks import Skipped
    from nnunet_ape.localize.localizer import check_organs, load_localizer
    from nnunet_ape.localize.predict_boxes import localize_volume
    from nnunet_ape.plots import boxes_png
    from nnunet_ape.resume import unfinished

    localizer, ape_path, bpr_path = load_localizer(args.localizer, args.model, args.bpr_model)
    check_organs(localizer, args.organs)  # before any work or output
    images = resolve_images(args.input)
    for image in images:
        check_header(image)  # before any output: a bad file stops the job in one line
    device = str(resolve_device(args.device))
    ape_model = load_ape_model(ape_path)[0] if ape_path else None
    bpr_model = load_bpr_model(bpr_path)[0] if bpr_path else None
    todo = unfinished(images, lambda i: args.output / f"{output_name(i)}_boxes.json", args.overwrite, "box files")
    skipped = Skipped()  # cases whose voxels cannot be used (NaN): left out, named at the end
    for image in tqdm(todo, desc="localizing", unit="case", disable=len(todo) <= 1):
        ct = skipped.read(output_name(image), lambda: read_volume(image, min_size=MIN_VOXELS))
        if ct is None:
            continue
        canon = canonical_ct(ct)  # once per case: localization and the PNG work in canonical order
        boxes = localize_volume(localizer, canon, ape_model, bpr_model, device, args.organs)
        name = output_name(image)
        result = {"image": str(image), "shape": list(ct.shape), "spacing": list(ct.spacing), "organs": boxes}
        if args.png:
            boxes_png(canon, boxes, args.output / f"{name}_boxes.png", title=f"{image.name}: organ boxes")
        with atomic_path(args.output / f"{name}_boxes.json") as tmp:  # last: the case's done mark
            Path(tmp).write_text(json.dumps(result, indent=1))
        tqdm.write(f"{image} -> {args.output / (name + '_boxes.json')}")
    skipped.finish()
