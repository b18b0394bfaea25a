"""Benchmark: does keeping training views shorter than the scan (pretrain ape --max-scan-fraction) make APE maps
agree across patients?

For each fraction, one tiny model is pretrained on the same synthetic cohort with the demo's settings (coarse
views, naive variant, cosine lr), then measured on held-out phantoms:

- z read-out error: on each held-out phantom, a linear map from embedding to anatomical height (mm, known from the
  phantom generator) is fitted over the body; its mean absolute error on the same phantom ("own") and on the other
  phantoms ("others"). A model that encodes position within the scan window fits its own phantom well and the
  others badly, by about the difference of the scans' positions.
- the localization protocol, 1-shot, all 9 organs: mean box IoU of APE's 6 points, the all-voxels label transfer
  and the body-box baseline (measured in the same run), and the calibrated recall of the 6 points.

    python benchmarks/bench_scan_fraction.py [--fractions 0 0.4 0.6 0.8] [--iterations 1200]

Fraction 0 is the old behaviour (views as long as the patch, air beyond the scan's ends), the baseline of the run.
About 4 minutes per fraction on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_embed import machine


def z_readout_errors(cases: list, cohort_seed: int) -> tuple[float, float]:
    """Mean |error| (mm) of a per-phantom linear read-out of anatomical z from the map: on its own phantom, and
    applied to the other phantoms. ``cases``: prepared cases (canonical maps) in cohort order."""
    from nnunet_ape.phantoms import anatomical_z

    data = []
    for index, case in enumerate(cases):
        lo, hi = np.asarray(case.body).astype(int)
        inside = case.embedding[lo[0] : hi[0] : 3, lo[1] : hi[1] : 3, lo[2] : hi[2]]  # every 3rd voxel in-plane
        heights = np.broadcast_to(anatomical_z(cohort_seed, index)[lo[2] : hi[2]], inside.shape[:3])
        design = np.c_[inside.reshape(-1, inside.shape[-1]).astype(np.float64), np.ones(heights.size)]
        data.append((design, heights.reshape(-1)))
    weights = [np.linalg.lstsq(design, z, rcond=None)[0] for design, z in data]
    errors = np.array([[np.abs(design @ w - z).mean() for design, z in data] for w in weights])
    own = errors.diagonal().mean()
    others = errors[~np.eye(len(errors), dtype=bool)].mean()
    return float(own), float(others)


def measure(fraction: float, train: Path, test: Path, test_seed: int, iterations: int, seed: int, work: Path) -> dict:
    """Pretrain one tiny model with views capped at ``fraction`` of the scan and measure it on ``test``."""
    from nnunet_ape.checkpoint import load_ape_model
    from nnunet_ape.demo import DEMO_BATCH, DEMO_LR
    from nnunet_ape.embed import stored_settings
    from nnunet_ape.inputs import nnunet_images
    from nnunet_ape.cases import cases_from_nnunet
    from nnunet_ape.localize.evaluate import evaluate_localization, prepare
    from nnunet_ape.phantoms import ORGAN_LABELS
    from nnunet_ape.pretrain.batches import BatchConfig
    from nnunet_ape.pretrain.train_ape import PretrainConfig, pretrain_ape

    cfg = PretrainConfig(iterations=iterations, lr=DEMO_LR, lr_schedule="cosine", model="tiny", device="cpu", workers=1,
                         batch=BatchConfig(**DEMO_BATCH, max_scan_fraction=fraction), checkpoint_every=iterations, seed=seed)
    start = time.monotonic()
    model, state = load_ape_model(pretrain_ape(nnunet_images(train), work / f"run_{fraction:g}", cfg))
    seconds = time.monotonic() - start
    settings = stored_settings(state, half=True)
    cases = cases_from_nnunet(str(test))
    with tempfile.TemporaryDirectory() as store:
        prepared = [prepare(c, model, settings, "cpu", store=Path(store)) for c in cases]
        own, others = z_readout_errors(prepared, test_seed)
        del prepared
    mean = evaluate_localization(cases, dict(ORGAN_LABELS), model, settings, shots=1)["mean"]
    return {"fraction": fraction, "pretrain_s": seconds, "z_own_mm": own, "z_others_mm": others,
            "iou_ape": mean["iou_ape"], "iou_ape_all": mean["iou_ape_all"], "iou_body_box": mean["iou_body_box"],
            "recall_calibrated_ape": mean["recall_calibrated_ape"], "mre_c": mean["mre_c"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.4, 0.6, 0.8])
    parser.add_argument("--iterations", type=int, default=1200)
    parser.add_argument("--train", type=int, default=16, help="phantoms to pretrain on (cohort seed 100)")
    parser.add_argument("--test", type=int, default=6, help="held-out phantoms (cohort seed 201)")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    from nnunet_ape.phantoms import write_cohort

    print(f"machine: {machine()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_cohort(work / "train", args.train, seed=100)
        write_cohort(work / "test", args.test, seed=201)
        for fraction in args.fractions:
            rows.append(measure(fraction, work / "train", work / "test", 201, args.iterations, args.seed, work))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.iterations} iterations, tiny model, {args.train} training phantoms, 1-shot on {args.test} held-out ones\n")
    print("| max scan fraction | pretraining | z read-out, own / other phantoms | MRE_c | IoU APE 6 points | "
          "IoU APE all voxels | IoU body box | calibrated recall, 6 points |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = "none (old)" if r["fraction"] == 0 else f"{r['fraction']:g}"
        print(f"| {name} | {r['pretrain_s']:.0f} s | {r['z_own_mm']:.0f} / {r['z_others_mm']:.0f} mm | {r['mre_c']:.0f} mm | "
              f"{r['iou_ape']:.3f} | {r['iou_ape_all']:.3f} | {r['iou_body_box']:.3f} | {r['recall_calibrated_ape']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
