"""Benchmark: few-shot localization on the head-and-neck cohort (../shared/data/Dataset901_HeadNeckCT), on CPU.

1. APE pretraining on the cohort's 163 training CTs (labels unused; :mod:`headneck_split`) with the CPU recipe
   below, capped at ``--minutes`` (skipped with ``--reuse`` when the run folder has a final checkpoint).
2. On the 40 test cases (hn_169..hn_214), never seen in pretraining: the paper's protocol (``nnunet_ape.localize.evaluate``) at
   1, 3 and 5 shots, ``--folds`` folds each; per organ only the cases that contour it (shots and tests): MRE_c,
   MRE_ep, IoU, VR@99, and the shot-calibrated crops of APE 6 points, APE all voxels, the body box and the method
   ``localize fit`` chooses per organ on each fold's shots.

    python benchmarks/bench_headneck.py [--minutes 58] [--reuse] [--folds 3] [--work /tmp/bench_headneck]

Prints the machine, the date, the pretraining it ran (iterations reached, minutes) and Markdown tables; writes
``WORK/headneck_localization.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_embed import machine
from headneck_split import HEADNECK, split

from nnunet_ape.cli.common import COMBINE_CHOICES, DEFAULT_COMBINE
from nnunet_ape.pretrain.choices import POINT_MODES

# The CPU recipe: a 'small' network on views at 4-5 mm (the cohort's own in-plane spacing; its 2.5-3 mm slices are
# coarsened a little), 300k-voxel views (about 300 mm across: most of a head and neck), 4 view pairs and 2048
# voxel pairs per batch, equivariance variant, cosine learning rate from 1e-3. About 0.45 s per iteration on 2 cores.
RECIPE = ["--model", "small", "--spacing", "4,4,4:5,5,5", "--patch-volume", "300000", "--pairs", "4", "--voxels", "2048",
          "--variant", "equiv", "--lr", "1e-3", "--lr-schedule", "cosine", "--workers", "1", "--checkpoint-every", "500"]


def pretrain(images: list[Path], run: Path, iterations: int, minutes: float, reuse: bool, recipe: list[str] = RECIPE) -> dict:
    """Run ``nnunet-ape pretrain ape`` with ``recipe`` (flags) on ``images`` into ``run``; returns what it reached
    (``seconds``: wall time of this call; for a reused run, the training seconds its log.csv recorded)."""
    import torch

    final = run / "checkpoint_final.pt"
    seconds = None
    if not (reuse and final.exists()):
        run.mkdir(parents=True, exist_ok=True)
        listing = run / "images.txt"
        listing.write_text("\n".join(str(p) for p in images) + "\n")
        t0 = time.perf_counter()
        resume = ["--resume"] if (run / "checkpoint_last.pt").exists() else []
        subprocess.run([sys.executable, "-m", "nnunet_ape", "pretrain", "ape", "-i", str(listing), "-o", str(run), *recipe,
                        "--iterations", str(iterations), "--max-minutes", str(minutes), *resume], check=True)
        seconds = time.perf_counter() - t0
    elif (run / "log.csv").exists():
        from nnunet_ape.training_log import CsvLog

        rows = CsvLog(run / "log.csv", ["iteration", "seconds"]).read()
        seconds = float(rows[-1]["seconds"]) if rows else None
    state = torch.load(final, map_location="cpu", weights_only=True)
    return {"checkpoint": str(final), "iterations": int(state.get("iteration", -1)), "seconds": seconds}


def evaluate(checkpoint: Path, cases: list, organs: dict[str, int], shots: list[int], folds: int, device: str = "cpu",
             bpr_checkpoint: Path | None = None, all_voxels: bool = True, search_margin_mm: float | None = 5.0,
             combine: str = DEFAULT_COMBINE) -> dict:
    """The protocol at each k in ``shots`` on ``cases`` (embedded, and scored with ``bpr_checkpoint``, once);
    ``{"embed_seconds": s, "results": {k: evaluate_localization-like result}}``. ``search_margin_mm``: retrieval
    searches the body grown by this much (None: the whole image, as before 2026-12-05); ``combine``: how the shots'
    boxes are combined (``localize fit --combine``)."""
    from tqdm import tqdm

    from nnunet_ape.bpr.scoring import load_bpr_model
    from nnunet_ape.checkpoint import load_ape_model
    from nnunet_ape.localize.evaluate import BPR_METHODS, METHODS, TransferBoxes, evaluate_organ, mean_over_organs, prepare
    from nnunet_ape.localize.localizer import embed_settings_for

    model, _ = load_ape_model(checkpoint)
    settings = embed_settings_for(checkpoint)
    bpr_model = load_bpr_model(bpr_checkpoint)[0] if bpr_checkpoint else None
    methods = [*METHODS, *(BPR_METHODS if bpr_model is not None else ())]
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-headneck-") as store:
        t0 = time.perf_counter()
        prepared = [prepare(c, model, settings, device, bpr_model, Path(store), search_margin_mm)
                    for c in tqdm(cases, desc="embedding", unit="case")]
        embed_s = time.perf_counter() - t0
        for k in shots:
            t0 = time.perf_counter()
            transfer = TransferBoxes(list(organs.values()))
            per_organ = {name: evaluate_organ(prepared, value, k, combine=combine, transfer=transfer, max_folds=folds,
                                               all_voxels=all_voxels)
                         for name, value in tqdm(organs.items(), desc=f"{k}-shot", unit="organ")}
            out[k] = {"organs": per_organ, "mean": mean_over_organs(per_organ), "seconds": time.perf_counter() - t0,
                      "settings": {"shots": k, "target_recall": 0.99, "combine": combine, "cases": len(cases),
                                   "methods": [m for m in methods if all_voxels or m != "ape_all"], "max_folds": folds}}
        del prepared
    return {"embed_seconds": embed_s, "results": out}


def summary(results: dict) -> str:
    """One row per k: the mean over organs of IoU and of the calibrated crops per method, and the choice."""
    from nnunet_ape.localize.evaluate import TITLES

    first = next(iter(results.values()))["mean"]
    boxes = [m for m in ("ape", "ape_all", "body_box", "bpr_z", "ape_bpr") if f"iou_{m}" in first]
    crops = [m for m in ("ape", "ape_all", "body_box", "bpr_z", "ape_bpr", "body_bpr", "chosen") if f"recall_calibrated_{m}" in first]
    head = ["shots", "MRE_c (mm)"] + [f"IoU {TITLES[m]}" for m in boxes] + [f"recall / VR {TITLES[m]}" for m in crops]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, r in results.items():
        m = r["mean"]
        cells = [str(k), f"{m['mre_c']:.1f}"] + [f"{m[f'iou_{x}']:.3f}" for x in boxes]
        cells += [f"{m[f'recall_calibrated_{x}']:.3f} / {m[f'vr_calibrated_{x}']:.1f}" for x in crops]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HEADNECK, help="the head-and-neck nnU-Net raw dataset")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_headneck"), help="pretraining run and results")
    parser.add_argument("--iterations", type=int, default=7500, help="pretraining iterations (cosine schedule length)")
    parser.add_argument("--minutes", type=float, default=58.0, help="pretraining time cap")
    parser.add_argument("--model", type=Path, help="evaluate this APE checkpoint instead of pretraining one")
    parser.add_argument("--bpr-model", type=Path, help="a BPR checkpoint (bench_headneck_bpr.py): adds BPR z and APE x/y + BPR z")
    parser.add_argument("--reuse", action="store_true", help="keep WORK/ape's final checkpoint if it exists")
    parser.add_argument("--eval-cases", type=int, default=None, help="evaluate on the first N test cases only")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--folds", type=int, default=3, help="folds per k (each tests on every other evaluation case)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--spacing", default=RECIPE[RECIPE.index("--spacing") + 1],
                        help="the recipe's view spacing range (pretrain ape --spacing), e.g. 2.5,2.5,2.5:3.5,3.5,3.5")
    parser.add_argument("--combine", default=DEFAULT_COMBINE, choices=COMBINE_CHOICES,
                        help="how the shots' boxes are combined, as localize fit --combine [trimmed since 2026-12-06; mean before]")
    parser.add_argument("--points", default="uniform", choices=POINT_MODES,
                        help="where the recipe's voxel pairs fall (pretrain ape --points)")
    parser.add_argument("--seed", type=int, default=0, help="the recipe's pretraining seed (pretrain ape --seed)")
    parser.add_argument("--search-margin", default="5",
                        help="retrieval searches the body grown by this many mm; 'none': the whole image (the old search)")
    args = parser.parse_args()
    margin = None if args.search_margin.lower() == "none" else float(args.search_margin)
    recipe = [args.spacing if i > 0 and RECIPE[i - 1] == "--spacing" else x for i, x in enumerate(RECIPE)]
    recipe += ["--points", args.points, "--seed", str(args.seed)]

    from nnunet_ape.cases import cases_from_nnunet

    cases = sorted(cases_from_nnunet(str(args.data)), key=lambda c: c.name)
    train, held_out = split(cases)
    held_out = held_out[: args.eval_cases]
    organs = {k: v for k, v in cases[0].labels.items() if v}
    print(f"machine: {machine()}; date {time.strftime('%Y-%m-%d')}")
    print(f"cohort: {len(cases)} cases; pretraining on {len(train)} ({train[0].name}..{train[-1].name}), "
          f"evaluating on {len(held_out)} ({held_out[0].name}..{held_out[-1].name})")
    if args.model:
        run = {"checkpoint": str(args.model), "iterations": None, "seconds": None}
    else:
        run = pretrain([c.image for c in train], args.work / "ape", args.iterations, args.minutes, args.reuse, recipe)
    print(f"APE pretraining: {run}; recipe: {' '.join(recipe)}")
    print(f"retrieval searches: {'the whole image' if margin is None else f'the body grown by {margin:g} mm'}")
    evaluation = evaluate(Path(run["checkpoint"]), held_out, organs, args.shots, args.folds, args.device, args.bpr_model,
                          search_margin_mm=margin, combine=args.combine)
    from nnunet_ape.localize.evaluate import markdown_tables

    report = [f"# Head-and-neck localization ({time.strftime('%Y-%m-%d')}, {machine()})", "",
              f"Pretraining: {run}", f"Recipe: {' '.join(recipe)}", f"BPR: {args.bpr_model}",
              f"Search: {'whole image' if margin is None else f'body + {margin:g} mm'}", f"Shots' boxes combined: {args.combine}", f"Embedding {len(held_out)} cases: {evaluation['embed_seconds']:.0f} s", "",
              summary(evaluation["results"]), ""]
    for k, result in evaluation["results"].items():
        report += [f"({k}-shot evaluation: {result['seconds']:.0f} s)", "", markdown_tables(result), ""]
    text = "\n".join(report)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "headneck_localization.md").write_text(text)
    (args.work / "headneck_localization.json").write_text(json.dumps({"run": run, **evaluation}, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
