"""Prediction time of the head-and-neck segmentation benchmark's models, measured side by side in one run.

The stages of ``bench_headneck_segmentation.py`` predict their test cases in different invocations, hours or
sessions apart, and this machine's CPU time for the same work varies by up to 2.5x from one hour to the next. This
command predicts the same ``--cases`` test cases with each stage's trained model(s), case by case in turn (case 1
with every stage, then case 2, ...), each case in a process of its own (model loading not counted), into
``WORK/timing/<stage>/``, and reports per stage the mean and median seconds per case and the ratios to the first
stage (the full-image baseline) over the same cases, as ratios of means and medians and the median of the per-case
ratios:

    python benchmarks/bench_headneck_segmentation.py timing --cases 10 [--stages full crop crop_tight]

Writes ``WORK/timing/timing.json`` and ``timing.md``. The predictions themselves are thrown away after timing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import date
from pathlib import Path

import numpy as np

TIMED = ("full", "coarse", "crop", "crop_tight", "channels")


def _command(seg, work: Path, stage: str, settings: dict, image: Path, out: Path, device: str) -> list[str]:
    """The prediction command of one case with ``stage``'s model(s), the one the stage itself runs."""
    if stage in seg.WHOLE_IMAGE and stage != "channels":
        listing = out / ".case.txt"
        listing.write_text(f"{image}\n")
        return seg.stock_predict_command(work, stage, settings, listing, out, device)
    return seg.localized_predict_command(work, stage, settings, [image], out, out / ".run.json", device)


def _seconds(out: Path, case: str) -> float:
    """The case's prediction seconds, model loading excluded, from what the stage's command wrote."""
    timings = out / "timings.jsonl"
    if timings.exists():  # stock predictor
        return float(json.loads(timings.read_text().splitlines()[-1])["case_seconds"])
    return float(json.loads((out / f"{case}_boxes.json").read_text())["seconds"]["case"])


def run_timing(seg, work: Path, stages: list[str], cases: int, device: str, env: dict) -> str:
    """Time ``stages`` (the first is the baseline) on the first ``cases`` test cases, interleaved; returns the
    report's text."""
    from bench_embed import machine

    settings = {}
    for stage in stages:
        if stage not in TIMED:
            raise SystemExit(f"timing: stage '{stage}' has no prediction to time; choose from {', '.join(TIMED)}")
        trained_as = seg.IMPLEMENTED[stage].get("models_of", stage)
        file = work / trained_as / "settings.json"
        settings[stage] = json.loads(file.read_text()) if file.exists() else None
        if settings[stage] is None or not seg.is_trained(work, stage, settings[stage]):
            raise SystemExit(f"timing: stage '{stage}' is not trained yet; run it first")
    _, test = seg.split_cases()
    test = test[:cases]
    raw = work / "nnUNet_raw" / seg.DATASET / "imagesTs"
    root = work / "timing"
    seconds: dict[str, dict[str, float]] = {s: {} for s in stages}
    for case in test:
        for stage in stages:
            out = root / stage / case
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            command = _command(seg, work, stage, settings[stage], raw / f"{case}_0000.nii.gz", out, device)
            if subprocess.run(command, env=env, capture_output=True, text=True).returncode != 0:
                raise SystemExit(f"timing: {stage} failed on {case}")
            seconds[stage][case] = _seconds(out, case)
            shutil.rmtree(out)
            print(f"  {case} {stage}: {seconds[stage][case]:.1f} s", flush=True)
    base = stages[0]
    lines = [f"Prediction seconds per case, {len(test)} test cases, each stage in turn per case ({date.today().isoformat()}, "
             f"{machine()}, device {device}); ratios against {base} on the same cases", "",
             "| stage | mean s | median s | mean ratio | median ratio | median of per-case ratios |", "|---|---|---|---|---|---|"]
    for stage in stages:
        values = np.array([seconds[stage][c] for c in test])
        reference = np.array([seconds[base][c] for c in test])
        lines.append(f"| {stage} | {values.mean():.1f} | {np.median(values):.1f} | {reference.mean() / values.mean():.2f} | "
                     f"{np.median(reference) / np.median(values):.2f} | {np.median(reference / values):.2f} |")
    text = "\n".join(lines) + "\n"
    (root / "timing.md").write_text(text)
    (root / "timing.json").write_text(json.dumps({"cases": test, "seconds": seconds, "device": device,
                                                  "machine": machine(), "date": date.today().isoformat()}, indent=1))
    return text
