"""``nnunet-ape evaluate localization``: the paper's protocol with a body-box baseline."""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_ape.cli_common import add_labeled_case_args, labeled_cases
from nnunet_ape.errors import InputError


def add_parser(sub) -> None:
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
    add_labeled_case_args(p, "k: labeled cases per fold")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.set_defaults(func=_run_evaluate_localization)


def _run_evaluate_localization(args) -> None:
    import json

    from nnunet_ape.atomic import atomic_path
    from nnunet_ape.checkpoint import load_ape_model
    from nnunet_ape.distributed import resolve_device
    from nnunet_ape.localize.cases import resolve_organs
    from nnunet_ape.localize.evaluate import evaluate_localization, markdown_tables
    from nnunet_ape.localize.localizer import embed_settings_for

    cases = labeled_cases(args)
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
