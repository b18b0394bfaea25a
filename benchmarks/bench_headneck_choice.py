"""Benchmark: the per-organ method choice of ``localize fit`` against other rules, on the head-and-neck cohort.

For each APE checkpoint given (strong and weak maps: the recipe model, short lever runs), the localization protocol
runs at ``--shots`` shots on the first ``--eval-cases`` held-out cases of ../shared/data/Dataset901_HeadNeckCT
with as many folds as the cases allow (``--folds``). Each fold records the leave-one-shot-out selection scores of
every candidate on its shots and every candidate's calibrated crops on its test cases (``evaluate_organ``'s
``per_fold``), so any rule can be replayed on the same folds without measuring again. Rules replayed:

- ``current``: the rule of :mod:`nnunet_ape.localize.choice` (the localizer's own model method, APE all voxels or
  APE 6 points, when it matches the body box's held-out recall in crops no larger; else the body box);
- ``smallest reached``: the rule until 2026-12-04: among all candidates, the smallest crop whose mean held-out recall
  reaches the target, else the highest recall; ties to the body box;
- ``smallest matching body box``: as ``smallest reached``, among the candidates that match the body box's held-out
  recall in crops no larger;
- ``body box``, ``APE 6 points``, ``APE all voxels``: one method for every organ.

    python benchmarks/bench_headneck_choice.py --models recipe=/tmp/hn/ape_small/checkpoint_final.pt \
        coarse=/tmp/hn/levers/spacing_coarse_4_4_6-5_5_7.5/checkpoint_final.pt [--all-voxels] [--bpr-model CKPT]
    python benchmarks/bench_headneck_choice.py --replay WORK/choice.json     # rules only, from a saved run
    python benchmarks/bench_headneck_choice.py --replay BENCH_HEADNECK_WORK/headneck_localization.json

Prints the machine, the date and per model and rule: the mean over organs of the test cases' recall and volume
ratio (image / crop), and the organs where the rule kept less of the organ than the body box (by > 0.01).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from bench_embed import machine
from bench_headneck import HEADNECK, evaluate

WORSE = 0.01  # recall below the body box's by more than this counts as worse


def _current(selection: dict) -> str:
    from nnunet_ape.localize.choice import choose

    return choose(selection)


def _smallest_reached(selection: dict) -> str:
    from nnunet_ape.localize.choice import CANDIDATES

    order = [m for m in CANDIDATES if m in selection]
    reached = [m for m in order if selection[m]["reached"]]
    if reached:
        return min(reached, key=lambda m: (selection[m]["crop_fraction"], order.index(m)))
    return max(order, key=lambda m: (selection[m]["recall_mean"], -selection[m]["crop_fraction"], -order.index(m)))


def _smallest_matching_body_box(selection: dict) -> str:
    from nnunet_ape.localize.choice import at_least_body_box

    return _smallest_reached(at_least_body_box(selection))


RULES: dict[str, Callable[[dict], str]] = {
    "current": _current, "smallest reached": _smallest_reached, "smallest matching body box": _smallest_matching_body_box,
    "body box": lambda s: "body_box", "APE 6 points": lambda s: "ape", "APE all voxels": lambda s: "ape_all",
}


def replay(organs: dict[str, dict]) -> dict[str, dict]:
    """Per rule: mean over organs of the chosen crops' test recall and VR, and the organs worse than the body box.
    ``organs``: ``evaluate_organ`` results with ``per_fold``."""
    out = {}
    for rule, pick in RULES.items():
        recalls, vrs, worse = [], [], []
        for organ, r in organs.items():
            folds = [f for f in r.get("per_fold", []) if f["selection"]]
            if not folds or pick(folds[0]["selection"]) not in folds[0]["tests"]:
                continue
            recall = float(np.mean([f["tests"][pick(f["selection"])]["recall"] for f in folds]))
            vr = float(np.mean([f["tests"][pick(f["selection"])]["vr"] for f in folds]))
            body = float(np.mean([f["tests"]["body_box"]["recall"] for f in folds]))
            recalls.append(recall)
            vrs.append(vr)
            if recall < body - WORSE:
                worse.append(f"{organ} {recall:.3f} vs {body:.3f}")
        if recalls:
            out[rule] = {"recall": float(np.mean(recalls)), "vr": float(np.mean(vrs)), "organs": len(recalls), "worse": worse}
    return out


def table(replayed: dict[str, dict[str, dict]]) -> str:
    lines = ["| model | rule | recall | VR | organs worse than the body box |", "|---|---|---|---|---|"]
    for model, rules in replayed.items():
        for rule, r in rules.items():
            lines.append(f"| {model} | {rule} | {r['recall']:.3f} | {r['vr']:.1f} | {'; '.join(r['worse']) or '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[], help="NAME=CHECKPOINT pairs (APE checkpoints)")
    parser.add_argument("--data", type=Path, default=HEADNECK)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_headneck_choice"))
    parser.add_argument("--pretrain-cases", type=int, default=143, help="cases before these were pretraining cases")
    parser.add_argument("--eval-cases", type=int, default=40)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--folds", type=int, default=None, help="folds per organ (default: as many as the cases allow)")
    parser.add_argument("--all-voxels", action="store_true", help="include label transfer (slow: neighbour searches)")
    parser.add_argument("--bpr-model", type=Path, help="a BPR checkpoint: adds the BPR candidates")
    parser.add_argument("--replay", type=Path, help="a choice.json of an earlier run, or bench_headneck.py's "
                        "headneck_localization.json (its 3- and 5-shot folds): replay the rules only")
    args = parser.parse_args()

    if args.replay:
        saved = json.loads(args.replay.read_text())
        if "results" in saved:  # bench_headneck.py's headneck_localization.json: one entry per number of shots
            runs = {f"{k} shots": r["organs"] for k, r in saved["results"].items() if int(k) > 1}
        else:
            runs = saved["organs"]
        print(table({name: replay(organs) for name, organs in runs.items()}))
        return
    from nnunet_ape.cases import cases_from_nnunet

    cases = sorted(cases_from_nnunet(str(args.data)), key=lambda c: c.name)
    held_out = cases[args.pretrain_cases :][: args.eval_cases]
    organs = {k: v for k, v in cases[0].labels.items() if v}
    print(f"machine: {machine()}; date {time.strftime('%Y-%m-%d')}; {args.shots}-shot on {len(held_out)} cases "
          f"({held_out[0].name}..{held_out[-1].name}), folds {args.folds or 'all'}, all voxels {args.all_voxels}, BPR {args.bpr_model}")
    saved = {"organs": {}, "settings": vars(args) | {"date": time.strftime("%Y-%m-%d"), "machine": machine()}}
    replayed = {}
    for spec in args.models:
        name, checkpoint = spec.split("=", 1)
        result = evaluate(Path(checkpoint), held_out, organs, [args.shots], args.folds, bpr_checkpoint=args.bpr_model,
                          all_voxels=args.all_voxels)["results"][args.shots]
        saved["organs"][name] = result["organs"]
        replayed[name] = replay(result["organs"])
        print(table({name: replayed[name]}), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "choice.json").write_text(json.dumps(saved, indent=1, default=str))
    text = table(replayed)
    (args.work / "choice.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
