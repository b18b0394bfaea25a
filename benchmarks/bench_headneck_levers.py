"""Benchmark: quality levers of APE pretraining on the head-and-neck cohort, each against a default in the same run.

Every configuration pretrains the tiny APE network on the same cases (the cohort's 163 training cases,
:mod:`headneck_split`) for the same number of iterations and seed, then the localization protocol runs at
``--shots`` shots (``--folds`` folds) on the first ``--eval-cases`` of the 40 held-out cases, searching the body
as ``localize`` does (until 2026-12-05 the levers were ranked on the first 143 cases with the whole-image search).
One flag differs from the default per row: spacing range, view volume, variant, ``--max-scan-fraction``,
``--points``; ``--seeds`` repeats every row per seed and adds the mean. APE 6
points, the body box and the chosen method are columns of every row (all voxels is measured by bench_headneck.py:
its neighbour searches would take most of this benchmark's time). Short runs: they rank levers at CPU scale, not at GPU-length training.

    python benchmarks/bench_headneck_levers.py [--iterations 1000] [--levers default naive ...] [--seeds 0 1] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_embed import machine
from bench_headneck import HEADNECK, evaluate, pretrain
from headneck_split import split

DEFAULT = {"--model": "tiny", "--spacing": "4,4,4:5,5,5", "--patch-volume": "300000", "--pairs": "4", "--voxels": "2048",
           "--variant": "equiv", "--lr": "2e-3", "--lr-schedule": "cosine", "--workers": "1", "--max-scan-fraction": "0.6",
           "--checkpoint-every": "500", "--seed": "0"}
LEVERS = {
    "default": {},
    "spacing coarse (4,4,6:5,5,7.5)": {"--spacing": "coarse"},
    "spacing fine (2.5:3.5 mm)": {"--spacing": "2.5,2.5,2.5:3.5,3.5,3.5"},
    "view volume 150k": {"--patch-volume": "150000"},
    "view volume 600k": {"--patch-volume": "600000"},
    "variant naive": {"--variant": "naive"},
    "variant aug": {"--variant": "aug"},
    "max scan fraction none": {"--max-scan-fraction": "0"},
    "max scan fraction 0.8": {"--max-scan-fraction": "0.8"},
    "points body": {"--points": "body"},
    "points balanced": {"--points": "balanced"},
}


def flags(changes: dict[str, str]) -> list[str]:
    return [x for key, value in {**DEFAULT, **changes}.items() for x in (key, value)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HEADNECK)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_headneck_levers"))
    parser.add_argument("--iterations", type=int, default=800)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--folds", type=int, default=1)
    parser.add_argument("--eval-cases", type=int, default=40)
    parser.add_argument("--levers", nargs="+", default=[n for n in LEVERS if n not in ("view volume 600k", "variant aug", "max scan fraction 0.8")],
                        help="names of LEVERS rows to run (default: all but 600k views, aug and 0.8, for time)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="pretraining seeds per lever (several: a row each and their mean)")
    parser.add_argument("--reuse", action="store_true", help="keep finished pretraining runs")
    args = parser.parse_args()

    from nnunet_ape.cases import cases_from_nnunet

    cases = sorted(cases_from_nnunet(str(args.data)), key=lambda c: c.name)
    train, held_out = split(cases)
    held_out = held_out[: args.eval_cases]
    organs = {k: v for k, v in cases[0].labels.items() if v}
    print(f"machine: {machine()}; date {time.strftime('%Y-%m-%d')}; {args.iterations} iterations per lever; "
          f"pretraining on {len(train)} cases, {args.shots}-shot evaluation ({args.folds} folds) on {len(held_out)}")
    print(f"default: {' '.join(flags({}))}")
    rows = {}
    for name in args.levers:
        slug = name.replace(" ", "_").replace("/", "-").replace(",", "_").replace(":", "-").replace("(", "").replace(")", "")
        for seed in args.seeds:
            row = name if len(args.seeds) == 1 else f"{name} (seed {seed})"
            run = args.work / (slug if seed == 0 else f"{slug}_seed{seed}")
            reached = pretrain([c.image for c in train], run, args.iterations, 120.0, args.reuse,
                               flags({**LEVERS[name], "--seed": str(seed)}))
            result = evaluate(Path(reached["checkpoint"]), held_out, organs, [args.shots], args.folds, all_voxels=False)["results"][args.shots]
            m = result["mean"]
            parotids = [result["organs"][o] for o in ("parotid_left", "parotid_right")]
            rows[row] = {"seconds": reached["seconds"] or 0, **m,
                         "iou_ape_parotids": sum(p["iou_ape"] for p in parotids) / 2,
                         "iou_body_box_parotids": sum(p["iou_body_box"] for p in parotids) / 2}
            print(f"{row}: pretraining {reached['seconds'] or 0:.0f} s, MRE_c {m['mre_c']:.1f} mm, IoU APE {m['iou_ape']:.3f} "
                  f"/ body box {m['iou_body_box']:.3f}", flush=True)
        if len(args.seeds) > 1:
            runs = [rows[f"{name} (seed {seed})"] for seed in args.seeds]
            rows[f"{name} (mean of {len(runs)} seeds)"] = {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]
                                                          if all(isinstance(r[key], (int, float)) for r in runs)}
    head = ("| lever | pretraining (s) | MRE_c (mm) | IoU APE 6 points | IoU body box | "
            "IoU APE parotids | IoU body box parotids | recall / VR APE 6 points | recall / VR chosen | recall / VR body box |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['seconds'] or 0:.0f} | {r['mre_c']:.1f} | {r['iou_ape']:.3f} | "
                     f"{r['iou_body_box']:.3f} | {r['iou_ape_parotids']:.3f} | {r['iou_body_box_parotids']:.3f} | "
                     f"{r['recall_calibrated_ape']:.3f} / {r['vr_calibrated_ape']:.1f} | "
                     f"{r['recall_calibrated_chosen']:.3f} / {r['vr_calibrated_chosen']:.1f} | "
                     f"{r['recall_calibrated_body_box']:.3f} / {r['vr_calibrated_body_box']:.1f} |")
    table = "\n".join(lines)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "levers.json").write_text(json.dumps(rows, indent=1))
    (args.work / "levers.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
