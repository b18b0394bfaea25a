"""``nnunet-ape score`` (BPR slice scores of CTs) and ``nnunet-ape calibrate`` (landmark units for a BPR model)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_ape.cli.common import HelpFormatter, add_case_source_args, labeled_cases
from nnunet_ape.errors import InputError


def add_parser(sub) -> None:
    """Register the ``score`` command on the ``nnunet-ape`` subparsers ``sub``."""
    score = sub.add_parser(
        "score",
        help="BPR slice scores of CTs (JSON with bpreg's keys, optional PNG)",
        description="Score every axial slice with a BPR model (score rises from feet to head) and write CASE_bpr.json "
        "with bpreg's keys: 'unprocessed slice scores', 'cleaned slice scores' (empty slices dropped, smoothed along z), "
        "'z' (LPS mm), and with a calibrated model (see 'nnunet-ape calibrate') 'body part examined', 'body part "
        "examined tag', 'look-up table' and the slope check 'valid z-spacing'. Lists follow the file's slice order. "
        "Warns when the scores contradict the header's z order or spacing.",
        formatter_class=HelpFormatter,
    )
    score.add_argument("-m", "--model", required=True, type=Path, help="BPR checkpoint ('nnunet-ape pretrain bpr' or 'calibrate')")
    score.add_argument("-i", "--input", required=True, help="CT file, DICOM folder, folder of CTs, list file or nnU-Net raw dataset")
    score.add_argument("-o", "--output", required=True, type=Path, help="output folder (CASE_bpr.json per case)")
    score.add_argument("--png", action="store_true", help="also write CASE_bpr.png: score against z beside the coronal CT")
    score.add_argument("--smoothing-mm", type=float, default=10.0, help="Gaussian sigma along z for the cleaned scores (0: none)")
    score.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    score.add_argument("--overwrite", action="store_true", help="redo cases whose CASE_bpr.json exists (default: keep them, "
                       "so a restarted job skips the cases it finished)")
    score.set_defaults(func=_run_score)

    cal = sub.add_parser(
        "calibrate",
        help="calibrate a BPR model to landmark units on labeled cases",
        description="Score labeled cases, find landmark slices in their label maps (TotalSegmentator names: hip_*, "
        "femur_*, vertebrae_L5 ... vertebrae_C1, eye_*, or any STRUCTURE_top/_bottom/_centre) and map raw scores "
        "linearly so the two anchor landmarks get their values (bpreg: pelvis_start=0, eyes_end=100). Writes a new "
        "checkpoint holding the calibration: the look-up table of landmark scores and the expected score slope.",
        formatter_class=HelpFormatter,
    )
    cal.add_argument("-m", "--model", required=True, type=Path, help="BPR checkpoint to calibrate")
    add_case_source_args(cal)
    cal.add_argument("--anchor", action="append", metavar="LANDMARK=VALUE",
                     help="two anchors; default pelvis_start=0 and eyes_end=100 (give both or neither)")
    cal.add_argument("-o", "--output", type=Path, help="calibrated checkpoint to write (default: MODEL_calibrated.pt beside the model)")
    cal.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    cal.set_defaults(func=_run_calibrate)


def _run_score(args) -> None:
    import json
    import sys

    from tqdm import tqdm

    from nnunet_ape.atomic import atomic_path
    from nnunet_ape.bpr.calibration import Calibration
    from nnunet_ape.bpr.report import score_volume
    from nnunet_ape.bpr.scoring import MIN_SLICES, load_bpr_model
    from nnunet_ape.distributed import resolve_device
    from nnunet_ape.embed_files import check_header
    from nnunet_ape.input_checks import Skipped
    from nnunet_ape.inputs import resolve_images
    from nnunet_ape.io import output_name, read_volume
    from nnunet_ape.plots import scores_png
    from nnunet_ape.resume import unfinished

    if args.smoothing_mm < 0:
        raise InputError(f"--smoothing-mm {args.smoothing_mm}: must be >= 0 (0 turns smoothing off)")
    model, state = load_bpr_model(args.model)
    calibration = Calibration.from_dict(state["calibration"]) if state.get("calibration") else None
    images = resolve_images(args.input)
    for image in images:
        check_header(image, MIN_SLICES)
    if len({output_name(p) for p in images}) != len(images):
        raise InputError("input cases share names; give them unique file names")
    device = str(resolve_device(args.device))
    todo = unfinished(images, lambda i: args.output / f"{output_name(i)}_bpr.json", args.overwrite, "score files")
    skipped = Skipped()  # cases whose voxels cannot be used (NaN): left out, named at the end
    for image in tqdm(todo, desc="scoring", unit="ct", disable=len(todo) <= 1):
        ct = skipped.read(output_name(image), lambda: read_volume(image, min_size=MIN_SLICES))
        if ct is None:
            continue
        result = {"image": str(image), "model": str(args.model), **score_volume(model, ct, calibration, device, str(image), args.smoothing_mm)}
        target = args.output / f"{output_name(image)}_bpr.json"
        if args.png:
            scores_png(ct, result, target.with_suffix(".png"), title=f"{image.name}: BPR slice scores")
        with atomic_path(target) as tmp:  # last: the case's done mark
            Path(tmp).write_text(json.dumps(result, indent=1))
        for warning in result["warnings"]:
            print(f"nnunet-ape: warning: {image.name}: {warning}", file=sys.stderr)
        print(f"{image} -> {target} (tag {result['body part examined tag']})")
    skipped.finish()


def _run_calibrate(args) -> None:
    from nnunet_ape.bpr.calibration import fit_calibration, parse_anchors
    from nnunet_ape.bpr.scoring import load_bpr_model
    from nnunet_ape.checkpoint import save_atomic
    from nnunet_ape.distributed import resolve_device

    anchors = parse_anchors(args.anchor)
    model, state = load_bpr_model(args.model)
    cases = labeled_cases(args)
    calibration = fit_calibration(model, cases, anchors, str(resolve_device(args.device)))
    output = args.output or args.model.with_name(args.model.stem + "_calibrated.pt")
    save_atomic({**state, "calibration": calibration.to_dict()}, output)
    shown = ", ".join(f"{k} {v['mean']:.1f}" for k, v in calibration.lookup.items())
    print(f"calibrated on {len(cases)} case(s) -> {output}\nlandmark scores: {shown}")
