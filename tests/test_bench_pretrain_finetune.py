"""benchmarks/bench_pretrain_finetune.py --cohort headneck on a few cases: the split, the seven variants, the report.

Slow (more than 25 minutes on 2 cores on 2026-12-07; about 11 with five starts on 2026-12-02): planning 40
training cases, one pretraining epoch, the standalone APE pretraining for as long, the APE-channel plans, seven
4-iteration fine-tuning runs and their test prediction.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
HEADNECK = Path(__file__).resolve().parents[2] / "shared" / "data" / "Dataset901_HeadNeckCT"

VARIANTS = ("scratch", "ape", "ape_reinit", "ape_warmup", "ape_rescaled", "ape_matched", "channels")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HEADNECK.exists(), reason="head-and-neck dataset not available")]


def _run(work: Path) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_pretrain_finetune.py"), "--cohort", "headneck", "--work",
                           str(work), "--train-cases", "40", "--labeled", "2", "--seeds", "1", "--pretrain-iterations", "25",
                           "--epochs", "2", "--iterations-per-epoch", "2", "--test-cases", "1", "--variants", *VARIANTS], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_few_label_benchmark_keeps_the_split_and_compares_the_seven_starts(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    from headneck_split import is_test_case

    work = tmp_path / "ft"
    out = _run(work)
    raw = work / "nnUNet_raw" / "Dataset902_HeadNeckSplit"
    assert not any(is_test_case(p.name[:-12]) for p in (raw / "imagesTr").glob("*_0000.nii.gz"))  # pretraining sees no test CT
    folds = json.loads((work / "finetune" / "folds.json").read_text())
    run = folds["k2_s0"]
    assert len(run["train"]) == 2 and not set(run["train"]) & set(run["val"]) and len(run["val"]) <= 8
    labels = {v for k, v in json.loads((HEADNECK / "dataset.json").read_text())["labels"].items() if k != "background"}
    import numpy as np
    import SimpleITK as sitk

    for case in run["train"]:  # labeled cases contour every organ
        assert labels <= set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / f"{case}.nii.gz")))))
    splits = json.loads((work / "nnUNet_preprocessed" / "Dataset902_HeadNeckSplit" / "splits_final.json").read_text())
    assert splits[run["fold"]]["train"] == run["train"]
    assert "re-initialised" in out
    assert "to nnU-Net's initial weight norm" in out and "to nnU-Net's initial output spread on a training batch" in out
    warmup_log = next((work / "nnUNet_results").glob("*/nnUNetTrainerFinetuneAPEWarmup__*/fold_1/training_log_*.txt")).read_text()
    assert "learning rate 0.000500 at this epoch's first iteration" in warmup_log  # epoch 0 of 2: half-way up its warm-up epoch
    report = (work / "finetune" / "report.md").read_text()
    for variant in VARIANTS:
        assert f"| 2 | {variant} | 1 |" in report
        epochs = [json.loads(line) for line in (work / "finetune" / f"{variant}_k2_s0" / "training_log.jsonl").read_text().splitlines()]
        assert all(r["organ_volume_ratio"] is None or r["organ_volume_ratio"] >= 0 for r in epochs if r["kind"] == "epoch")
        assert f"| {variant}_k2_s0 | 4 |" in report  # the training's view
        scores = json.loads((work / "finetune" / f"{variant}_k2_s0" / "test_scores.json").read_text())
        assert len(scores["scores"]) == 1 and set(scores["dice"]) == {k for k in json.loads(
            (HEADNECK / "dataset.json").read_text())["labels"] if k != "background"}
    pretrained = sum(json.loads(line)["seconds"] for line in (work / "finetune" / "pretrain_seconds.jsonl").read_text().splitlines())
    standalone = json.loads((work / "finetune" / "ape_standalone.json").read_text())
    assert standalone["budget_seconds"] == pytest.approx(pretrained, abs=0.2)  # the same pretraining minutes
    plans = json.loads(next((work / "nnUNet_preprocessed").glob("*/nnUNetPlansCPU.json")).read_text())
    assert "3d_fullres_ape" in plans["configurations"]
    final = next((work / "nnUNet_results").glob("*/nnUNetTrainerFinetuneAPE__*/fold_1/checkpoint_final.pth"))
    stamp = final.stat().st_mtime_ns
    _run(work)  # a rerun finds every step done
    assert final.stat().st_mtime_ns == stamp
    assert (work / "finetune" / "curves.png").stat().st_size > 5000
