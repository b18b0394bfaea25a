"""Benchmark: Body Part Regression on the head-and-neck cohort, per trunk that fits a CPU budget.

Each trunk is pretrained (``nnunet-ape pretrain bpr``) on the first ``--pretrain-cases`` CTs of
../shared/data/Dataset901_HeadNeckCT for at most ``--minutes``, then ``evaluate bpr``'s measure runs on the other
cases: leave-one-case-out landmark MAE (slices, mm) for the organ edges of the cohort (each counted only where the
case contours the organ and the scan does not cut it) and monotonicity.

    python benchmarks/bench_headneck_bpr.py [--trunks tiny efficientnet] [--minutes 8] [--work /tmp/bench_headneck_bpr]

The checkpoints (``WORK/TRUNK/checkpoint_final.pt``) also serve ``bench_headneck.py --bpr-model``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench_embed import machine
from bench_headneck import HEADNECK

LANDMARKS = ["brainstem_top", "brainstem_bottom", "mandible_top", "mandible_bottom", "parotid_left_top",
             "parotid_left_bottom", "parotid_right_top", "parotid_right_bottom", "larynx_top", "larynx_bottom",
             "esophagus_top"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HEADNECK)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_headneck_bpr"))
    parser.add_argument("--pretrain-cases", type=int, default=143)
    parser.add_argument("--trunks", nargs="+", default=["tiny", "efficientnet"])
    parser.add_argument("--iterations", type=int, default=20000, help="cosine schedule length (the time cap usually ends a run first)")
    parser.add_argument("--minutes", type=float, default=8.0, help="pretraining time per trunk")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs")
    args = parser.parse_args()

    from nnunet_ape.bpr.evaluate import evaluate_models, markdown_report
    from nnunet_ape.cases import cases_from_nnunet

    cases = sorted(cases_from_nnunet(str(args.data)), key=lambda c: c.name)
    train, held_out = cases[: args.pretrain_cases], cases[args.pretrain_cases :]
    print(f"machine: {machine()}; date {time.strftime('%Y-%m-%d')}; pretraining on {len(train)} cases, "
          f"{args.minutes:g} min per trunk; evaluating on {len(held_out)}")
    checkpoints, seconds = [], {}
    for trunk in args.trunks:
        run = args.work / trunk
        final = run / "checkpoint_final.pt"
        if not (args.reuse and final.exists()):
            run.mkdir(parents=True, exist_ok=True)
            (run / "images.txt").write_text("\n".join(str(c.image) for c in train) + "\n")
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "nnunet_ape", "pretrain", "bpr", "-i", str(run / "images.txt"), "-o", str(run),
                            "--trunk", trunk, "--iterations", str(args.iterations), "--max-minutes", str(args.minutes),
                            "--lr-schedule", "cosine", "--workers", "1", "--checkpoint-every", "500"], check=True)
            seconds[trunk] = time.perf_counter() - t0
        checkpoints.append(final)
    result = evaluate_models(checkpoints, held_out, LANDMARKS)
    result["pretraining_seconds"] = seconds
    report = markdown_report(result)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "bpr_evaluation.json").write_text(json.dumps(result, indent=1))
    (args.work / "bpr_evaluation.md").write_text(report)
    print(report)
    print(f"pretraining seconds per trunk: {seconds}")


if __name__ == "__main__":
    main()
