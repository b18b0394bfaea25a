"""The few-label benchmark's bookkeeping: runs at once or in turn within a budget, and a record of its results that
outlives the work folder."""

from __future__ import annotations

import json
import shutil
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_headneck_segmentation as seg  # noqa: E402
import headneck_finetune as ft  # noqa: E402


def test_runs_in_turn_stop_at_the_first_that_does_not_fit_and_parallel_runs_overlap():
    started = []

    def job(name: str, fits: bool) -> bool:
        started.append(name)
        return fits

    assert ft.run_jobs([("a", True), ("b", False), ("c", True)], job) == [True, False]
    assert started == ["a", "b"]  # c never started: the budget was spent at b
    both = threading.Barrier(2, timeout=20)  # each job waits for the other: only jobs that run at once pass

    def meet(name: str) -> bool:
        both.wait()
        return name != "late"

    assert ft.run_jobs([("x",), ("late",)], meet, parallel=2) == [True, False]
    both = threading.Barrier(2, timeout=0.5)
    with pytest.raises(threading.BrokenBarrierError):  # in turn, the first job waits for a second that never comes
        ft.run_jobs([("x",), ("y",)], meet)

    def broken(name: str) -> bool:
        raise SystemExit(f"{name}: nnUNetv2_train failed")

    with pytest.raises(SystemExit, match="y: nnUNetv2_train failed"):
        ft.run_jobs([("y",)], broken, parallel=2)


def test_a_record_rebuilds_the_report_after_the_work_folder_is_gone(tmp_path):
    organs = list(seg.organ_labels())
    work, dest = tmp_path / "work", tmp_path / "record"
    (work / "finetune" / "scratch_k5_s0").mkdir(parents=True)
    (work / "finetune" / "settings.json").write_text(json.dumps({**ft.DEFAULTS, "epochs": 40, "iterations_per_epoch": 100}))
    epoch = {"kind": "epoch", "epoch": 0, "iterations": 100, "epoch_seconds": 600.0, "train_loss": 0.2, "val_loss": 0.3,
             "pseudo_dice": [0.5] * 7, "curve": {"dice": {o: 0.25 for o in organs}}}
    (work / "finetune" / "scratch_k5_s0" / "training_log.jsonl").write_text(json.dumps(epoch) + "\n")
    dice = {o: 0.1 * i for i, o in enumerate(organs)}
    (work / "finetune" / "scratch_k5_s0" / "test_scores.json").write_text(
        json.dumps({"variant": "scratch", "labeled": 5, "seed": 0, "dice": dice}))
    (work / "finetune" / "scratch_k5_s0" / "checkpoint_latest.pth").write_bytes(b"weights stay behind")
    original = ft.report(work)
    written = ft.record(work, dest)
    expected = {"finetune/settings.json", "finetune/report.md", "finetune/curves.png",
                "finetune/scratch_k5_s0/training_log.jsonl", "finetune/scratch_k5_s0/test_scores.json"}
    assert {p.relative_to(dest).as_posix() for p in written} == expected
    # nothing else under DEST: no checkpoint, no staging leftover of the atomic copies
    assert {p.relative_to(dest).as_posix() for p in dest.rglob("*") if not p.is_dir()} == expected
    shutil.rmtree(work)
    rebuilt = ft.report(dest)

    def table(report: str) -> list[str]:
        return [line for line in report.splitlines() if line.startswith(("| 5 |", "| scratch_k5_s0 |"))]

    assert len(table(original)) == 2 and "| 5 | scratch | 1 | 0.300 |" in table(original)[0]
    assert table(original) == table(rebuilt)
    assert (dest / "finetune" / "curves.png").stat().st_size > 0
