"""``nnunet-ape evaluate localization``: the paper's protocol with a body-box baseline."""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_ape.cli.common import HelpFormatter, add_case_source_args, add_labeled_case_args, labeled_cases
from nnunet_ape.errors import InputError
from nnunet_ape.localize.margins import ENLARGEMENTS


def add_parser(sub) -> None:
    """Register the ``evaluate`` command on the ``nnunet-ape`` subparsers ``sub``."""
    ev = sub.add_parser("evaluate", help="evaluation protocols (localization, bpr)", description="Evaluation protocols.")
    ev_sub = ev.add_subparsers(dest="evaluate_command", required=True, metavar="WHAT")
    p = ev_sub.add_parser(
        "localization",
        help="the paper's k-shot localization protocol with a body-box baseline",
        description="Cross-validated k-shot localization on labeled cases: landmark retrieval errors (MRE_c, MRE_ep), "
        "box IoU, VR@99, and recall/volume ratio with the enlargement calibrated on the shots (--enlargement, as 'localize fit'); APE against a baseline that places each "
        "organ at its average fraction of the body's bounding box, measured in the same run; with --bpr-model also BPR "
        "z-ranges (full x/y) and APE x/y with BPR z; and the method 'localize fit' chooses per organ on each fold's shots. "
        "Per organ only the cases that contour it count. Writes OUT/localization.md "
        "and OUT/localization.json.",
        formatter_class=HelpFormatter,
    )
    add_labeled_case_args(p, "k: labeled cases per fold")
    p.add_argument("--folds", type=int, default=None, help="evaluate the first N folds only (default: all, len/k folds, each "
                   "testing on every other case; on hundreds of cases a few folds say as much in a fraction of the time)")
    p.add_argument("--enlargement", default="margins", choices=ENLARGEMENTS,
                   help="how the calibrated crops grow from the boxes, as in 'localize fit': face margins in mm, or alpha")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.set_defaults(func=_run_evaluate_localization)

    b = ev_sub.add_parser(
        "bpr",
        help="BPR models compared: landmark-slice error and score monotonicity",
        description="Score labeled cases with one or more BPR models and compare them in one run: for each landmark "
        "(organ edges such as liver_top, kidneys_bottom, lungs_bottom; vertebrae L5 ... C1; any STRUCTURE_top/_bottom/"
        "_centre) the slice whose score is closest to the landmark's mean score on the other cases (leave one case out) "
        "against the true slice, as MAE in slices and mm; and how monotonic the scores are. Writes "
        "OUT/bpr_evaluation.md and .json.",
        formatter_class=HelpFormatter,
    )
    b.add_argument("--bpr-model", nargs="+", required=True, type=Path, help="BPR checkpoints to compare (e.g. one per trunk)")
    add_case_source_args(b)
    b.add_argument("--landmarks", nargs="+", help="landmark names (default: organ edges and vertebrae)")
    b.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    b.set_defaults(func=_run_evaluate_bpr)


def _run_evaluate_bpr(args) -> None:
    from nnunet_ape.bpr.evaluate import evaluate_models, markdown_report, write_report
    from nnunet_ape.bpr.landmarks import DEFAULT_EVALUATION_LANDMARKS, landmark_definition
    from nnunet_ape.distributed import resolve_device

    landmarks = args.landmarks or list(DEFAULT_EVALUATION_LANDMARKS)
    for name in landmarks:
        landmark_definition(name)  # unknown names fail before any work
    cases = labeled_cases(args)
    if len(cases) < 2:
        raise InputError(f"{len(cases)} labeled case(s): leave-one-case-out needs at least 2")
    result = evaluate_models(args.bpr_model, cases, landmarks, str(resolve_device(args.device)))
    write_report(result, args.output)
    print(markdown_report(result))


def _run_evaluate_localization(args) -> None:
    import json

    from nnunet_ape.atomic import atomic_path
    from nnunet_ape.bpr.scoring import load_bpr_model
    from nnunet_ape.checkpoint import load_ape_model
    from nnunet_ape.distributed import resolve_device
    from nnunet_ape.cases import resolve_organs
    from nnunet_ape.localize.evaluate import evaluate_localization, markdown_tables
    from nnunet_ape.localize.localizer import embed_settings_for

    if args.model is None:
        raise InputError("-m APE_CHECKPOINT is required (the protocol measures APE; --bpr-model adds the BPR rows)")
    cases = labeled_cases(args)
    if args.folds is not None and args.folds < 1:
        raise InputError(f"--folds {args.folds}: at least 1")
    if len(cases) <= args.shots:
        raise InputError(f"--shots {args.shots}: needs more labeled cases than shots, {len(cases)} given")
    organs = resolve_organs(args.organs, cases[0].labels)
    model, _ = load_ape_model(args.model)
    bpr_model = load_bpr_model(args.bpr_model)[0] if args.bpr_model else None
    result = evaluate_localization(cases, organs, model, embed_settings_for(args.model), args.shots,
                                   str(resolve_device(args.device)), args.target_recall, args.combine, bpr_model,
                                   args.folds, args.enlargement)
    table = markdown_tables(result)
    with atomic_path(args.output / "localization.json") as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1))
    with atomic_path(args.output / "localization.md") as tmp:
        Path(tmp).write_text(table)
    print(table)
