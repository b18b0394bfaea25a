"""The benchmarks' --minutes: a training run is not started when an epoch as long as the longest logged so far
cannot end in time (resumable_training.epoch_fits, used by its stages and by bench_pretrain_finetune)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import resumable_training as rt  # noqa: E402


def _log(work: Path, run: str, records: list[dict]) -> Path:
    log = work / run / "training_log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text("".join(json.dumps({"kind": "epoch", **r}) + "\n" for r in records))
    return log


def test_the_longest_logged_epoch_with_its_curve_point_sets_the_time_a_run_needs(tmp_path):
    missing = [tmp_path / "scratch_k5_s0" / "training_log.jsonl"]
    assert rt.longest_epoch_seconds(missing) == 0.0
    assert rt.epoch_fits(missing, time.time() + 5)  # nothing measured yet: start
    logs = [_log(tmp_path, "scratch_k5_s0", [{"epoch": 0, "epoch_seconds": 190.0}, {"epoch": 1, "epoch_seconds": 210.0},
                                              {"epoch": 2, "epoch_seconds": 200.0, "curve": {"seconds": 120.0}}]),
            _log(tmp_path, "ape_k5_s0", [{"epoch": 0, "epoch_seconds": 250.0}])]
    assert rt.longest_epoch_seconds(logs) == 320.0  # epoch 2 and its learning-curve point
    assert not rt.epoch_fits(logs, time.time() + 300)
    assert rt.epoch_fits(logs, time.time() + 400)
    assert rt.epoch_fits(logs, None)
    assert not rt.epoch_fits(missing, time.time() - 1)  # past the deadline: nothing starts
