"""bench_pretrain_finetune --minutes: a fine-tuning run is not started when its first epoch cannot end in time."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import headneck_finetune as ft  # noqa: E402


def _log(work: Path, run: str, records: list[dict]) -> None:
    folder = work / "finetune" / run
    folder.mkdir(parents=True)
    (folder / "training_log.jsonl").write_text("".join(json.dumps({"kind": "epoch", **r}) + "\n" for r in records))


def test_the_longest_logged_epoch_with_its_curve_point_sets_the_time_a_run_needs(tmp_path):
    assert ft.longest_epoch_seconds(tmp_path) == 0.0
    assert ft.time_to_start(tmp_path, time.time() + 5)  # nothing measured yet: start
    _log(tmp_path, "scratch_k5_s0", [{"epoch": 0, "epoch_seconds": 190.0}, {"epoch": 1, "epoch_seconds": 210.0},
                                     {"epoch": 2, "epoch_seconds": 200.0, "curve": {"seconds": 120.0}}])
    _log(tmp_path, "ape_k5_s0", [{"epoch": 0, "epoch_seconds": 250.0}])
    assert ft.longest_epoch_seconds(tmp_path) == 320.0  # epoch 2 and its learning-curve point
    assert not ft.time_to_start(tmp_path, time.time() + 300)
    assert ft.time_to_start(tmp_path, time.time() + 400)
    assert ft.time_to_start(tmp_path, None)
