"""The head-and-neck segmentation benchmark's report (benchmarks/headneck_seg_report.py) on a synthetic work folder:
training logs, test scores and box fractions written as the benchmark writes them, no training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_headneck_segmentation as seg  # noqa: E402
import headneck_seg_report as rep  # noqa: E402

ORGANS = {"brainstem": 1, "spinal_cord": 2, "mandible": 3}
SETTINGS = {**seg.DEFAULTS, "epochs": 3, "iterations_per_epoch": 10, "architecture": "reduced"}


@pytest.fixture(autouse=True)
def _organs(monkeypatch) -> None:
    monkeypatch.setattr(seg, "organ_labels", lambda source=None: dict(ORGANS))


def _epochs(seconds: list[float], loads: list[float], curve: dict[int, dict[str, float]]) -> str:
    lines = []
    for e, (s, load) in enumerate(zip(seconds, loads)):
        r = {"kind": "epoch", "epoch": e, "iterations": 10 * (e + 1), "epoch_seconds": s, "load_1min": load,
             "peak_rss_gib": 1.0 + e}
        if e in curve:
            r["curve"] = {"dice": curve[e], "seconds": 5.0}
        lines.append(json.dumps(r))
    return "\n".join(lines) + "\n"


def _scores(values: dict[str, dict[str, float]]) -> dict:
    return {case: {o: {"dice": d, "nsd_2mm": d / 2} for o, d in organs.items()} for case, organs in values.items()}


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    """full: 3 of 3 epochs (the second shared the CPU), final checkpoint, 2 test cases of 40 predicted;
    channels: 1 of 3 epochs, no test."""
    w = tmp_path / "work"
    (w / "full").mkdir(parents=True)
    (w / "full" / "settings.json").write_text(json.dumps(SETTINGS))
    (w / "full" / "training_log.jsonl").write_text(_epochs([10.0, 40.0, 20.0], [1.0, 1000.0, 1.0],
                                                           {1: {"brainstem": 0.2}, 2: {"brainstem": 0.4, "mandible": 0.6}}))
    model = seg.stage_models(w, "full")[0]
    fold = seg.model_folder(w, model, SETTINGS) / "fold_0"
    fold.mkdir(parents=True)
    (fold / "checkpoint_final.pth").write_bytes(b"weights")
    scores = _scores({"hn_169": {"brainstem": 0.5, "spinal_cord": 0.7}, "hn_170": {"brainstem": 0.7, "mandible": 0.8}})
    timing = {"case_seconds": 80.0, "preprocess": 1.0, "network": 78.0, "export": 1.0, "tta": True, "peak_rss_gib": 1.5}
    (w / "full" / "test_scores.json").write_text(json.dumps(
        {"cases": list(scores), "complete": True, "scores": scores, "timings": {c: timing for c in scores}, "nsd_mm": [2.0]}))
    (w / "channels").mkdir()
    (w / "channels" / "settings.json").write_text(json.dumps(SETTINGS))
    (w / "channels" / "training_log.jsonl").write_text(_epochs([30.0], [1.0], {}))
    return w


def test_model_rows_count_quiet_epochs_and_mark_partial_stages(work: Path) -> None:
    text = rep.report(seg, work, ["full", "channels"])
    full = next(line for line in text.splitlines() if line.startswith("| full |"))
    cells = [c.strip() for c in full.strip("|").split("|")]
    assert cells[1] == "trained"
    assert cells[2] == "30"
    assert cells[3] == "1.50 (2 of 3 epochs quiet)"  # (10 + 20) s over 2 quiet epochs of 10 iterations
    assert cells[4] == f"{(10 + 15 + 20) / 3600:.2f}"  # the shared epoch counted as the mean quiet one
    assert cells[5] == "2 (partial)"  # 2 of the 40 test cases
    assert cells[6].startswith("80.0 (preprocess 1.0 + network 78.0")
    channels = next(line for line in text.splitlines() if line.startswith("| channels |"))
    assert "partial: channels 1/3 epochs" in channels
    assert (work / "report.md").read_text() == text
    assert (work / "dice_vs_training_time.png").stat().st_size > 1000


def test_organ_table_averages_over_the_cases_that_contour_each_organ(work: Path) -> None:
    text = rep.report(seg, work, ["full"])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in {*ORGANS, "mean of the organs"}}
    assert rows["brainstem"][1:4] == ["2", "0.600", "0.300"]
    assert rows["spinal_cord"][1:3] == ["1", "0.700"]
    assert rows["mandible"][1:3] == ["1", "0.800"]
    assert rows["mean of the organs"][2] == "0.700"


def test_learning_curve_puts_each_point_at_its_quiet_training_hours(work: Path) -> None:
    series = rep.curve_series(rep.stage_logs(seg, work, "full"))
    assert series["brainstem"] == [((10 + 15) / 3600, 0.2), ((10 + 15 + 20) / 3600, 0.4)]
    assert series["mean"][-1] == ((10 + 15 + 20) / 3600, pytest.approx(0.5))


def test_box_table_counts_organs_cut_by_their_final_box() -> None:
    tests = {"crop": {"organ_in_box": {"a": {"brainstem": 1.0, "mandible": 0.985}, "b": {"brainstem": 0.995}},
                      "timings": {"a": {"boxes": {"cns": {"organs": ["brainstem"], "still_touched_faces": ["z-"]}}},
                                  "b": {"boxes": {"cns": {"organs": ["brainstem"], "still_touched_faces": []}}}}}}
    lines = rep.box_table(tests, list(ORGANS))
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in lines[2:]}
    assert rows["brainstem"] == "0.995 / 1 / 0 / 1"
    assert rows["mandible"] == "0.985 / 1 / 1 / 0"
    assert rows["spinal_cord"] == "-"
