"""APE pretraining on real CT: the loss falls, runs resume, torchrun data-parallel works (gloo, 2 processes)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli_in_process, real_patients
from nnunet_ape.checkpoint import load_checkpoint
from nnunet_ape.errors import InputError
from nnunet_ape.pretrain.batches import BatchConfig
from nnunet_ape.pretrain.loop import check_resumed_settings
from nnunet_ape.pretrain.train_ape import PretrainConfig, pretrain_ape
from nnunet_ape.training_log import CsvLog, loss_curves

SMALL_RUN = ["--model", "tiny", "--pairs", "2", "--voxels", "256", "--patch-volume", "20000", "--device", "cpu"]


def _losses(run: Path) -> tuple[list[int], list[float]]:
    with open(run / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [int(r["iteration"]) for r in rows], [float(r["loss"]) for r in rows]


def test_loss_falls_on_real_patients(pretrained_run):
    iterations, losses = _losses(pretrained_run)
    assert iterations == list(range(1, 1001))
    first, last = np.mean(losses[:50]), np.mean(losses[-50:])
    print(f"naive variant, patients A-E: loss {first:.3f} (first 50) -> {last:.3f} (last 50)")
    assert last < 0.8 * first
    assert (pretrained_run / "loss.png").stat().st_size > 10_000
    state = load_checkpoint(pretrained_run / "checkpoint_final.pt")
    assert state["iteration"] == 1000 and "optimizer" not in state
    # the naive variant's total is its distance loss: one curve that says so, not two identical ones
    log = CsvLog(pretrained_run / "log.csv", ["iteration", "loss", "dist", "equiv", "lr", "seconds"])
    assert [label for label, _ in loss_curves(log.read(), log.columns)] == ["total loss = distance loss (APE positions)"]


def test_equiv_variant_loss_falls_on_real_patients(tmp_path):
    cfg = PretrainConfig(
        iterations=300, lr=2e-3, model="tiny", device="cpu", workers=2, checkpoint_every=100,
        batch=BatchConfig(variant="equiv", pairs=2, voxels=512, patch_volume=40_000),
    )
    pretrain_ape(real_patients(), tmp_path / "run", cfg)
    _, losses = _losses(tmp_path / "run")
    first, last = np.mean(losses[:50]), np.mean(losses[-50:])
    print(f"equiv variant, patients A-E: loss {first:.3f} (first 50) -> {last:.3f} (last 50)")
    assert last < 0.85 * first
    log = CsvLog(tmp_path / "run" / "log.csv", ["iteration", "loss", "dist", "equiv", "lr", "seconds"])
    labels = [label for label, _ in loss_curves(log.read(), log.columns)]
    assert labels == ["total loss", "distance loss (APE positions)", "equivariance loss"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "nnunet_ape", *args]


def test_killed_run_resumes_with_iteration_count_optimizer_and_log(tmp_path, capsys):
    listing = tmp_path / "cts.txt"
    listing.write_text("\n".join(str(p) for p in real_patients()))
    run = tmp_path / "run"
    args = ["pretrain", "ape", "-i", str(listing), "-o", str(run), *SMALL_RUN, "--workers", "1", "--checkpoint-every", "20"]
    process = subprocess.Popen(_cli(*args, "--iterations", "100000"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (run / "checkpoint_last.pt").exists():
        time.sleep(0.5)
    time.sleep(2.0)  # let it run past the checkpoint, as a real crash would
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = load_checkpoint(run / "checkpoint_last.pt")["iteration"]
    assert saved >= 20 and saved % 20 == 0
    target = saved + 30
    # a second run must not silently overwrite the first (refusals in-process: no interpreter start-up per call)
    code, _, err = cli_in_process(capsys, *args, "--iterations", str(target))
    assert code == 2 and "--resume" in err
    # nor continue it as another recipe: the points' sampling is fixed at the start
    code, _, err = cli_in_process(capsys, *args, "--iterations", str(target), "--resume", "--points", "body")
    assert code == 2 and "batch.points uniform -> body" in err
    assert load_checkpoint(run / "checkpoint_last.pt")["iteration"] == saved
    subprocess.run(_cli(*args, "--iterations", str(target), "--resume"), check=True, capture_output=True)
    iterations, _ = _losses(run)
    assert iterations == list(range(1, target + 1))  # rows after the lost checkpoint dropped, no duplicates
    last = load_checkpoint(run / "checkpoint_last.pt")
    assert last["iteration"] == target
    steps = {int(s["step"]) for s in last["optimizer"]["state"].values()}
    assert steps == {target}  # Adam moments continued from the checkpoint, not restarted


def test_resume_checks_only_the_settings_the_run_recorded(tmp_path):
    started = PretrainConfig(model="tiny", lr=1e-3, batch=BatchConfig(points="body")).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(started))
    check_resumed_settings(tmp_path, PretrainConfig(model="tiny", lr=1e-3, iterations=9, workers=0, batch=BatchConfig(points="body")))
    with pytest.raises(InputError, match=r"batch.points body -> uniform; lr 0.001 -> 0.002\)"):
        check_resumed_settings(tmp_path, PretrainConfig(model="tiny", lr=2e-3))
    # a run from before --points existed recorded no points: it resumes with the default it ran with
    del started["batch"]["points"]
    (tmp_path / "config.json").write_text(json.dumps(started))
    check_resumed_settings(tmp_path, PretrainConfig(model="tiny", lr=1e-3))


def test_resume_without_a_run_is_refused(tmp_path):
    with pytest.raises(InputError, match="no checkpoint_last.pt"):
        pretrain_ape(real_patients()[:1], tmp_path / "none", PretrainConfig(model="tiny", device="cpu"), resume=True)


def test_torchrun_data_parallel_on_cpu_with_gloo(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found"
    listing = tmp_path / "cts.txt"
    listing.write_text("\n".join(str(p) for p in real_patients()[:2]))
    run = tmp_path / "ddp"
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "nnunet_ape", "pretrain", "ape", "-i", str(listing),
         "-o", str(run), *SMALL_RUN, "--workers", "0", "--iterations", "6", "--checkpoint-every", "3"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 process(es)" in result.stdout
    iterations, _ = _losses(run)
    assert iterations == list(range(1, 7))  # one log, written by rank 0 only
    state = load_checkpoint(run / "checkpoint_final.pt")
    assert state["iteration"] == 6
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_non_finite_loss_skips_the_step_and_leaves_the_model_unchanged():
    from nnunet_ape.pretrain.loop import _optimizer_step

    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    assert not _optimizer_step(None, model, optimizer, None, 0.1, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    loss = model(torch.ones(1, 3)).sum()
    assert _optimizer_step(loss, model, optimizer, None, 0.1, 1.0)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_spacing_range_names_and_the_embedding_settings_that_follow():
    from nnunet_ape.errors import InputError
    from nnunet_ape.pretrain.batches import BatchConfig
    from nnunet_ape.pretrain.train_ape import COARSE_SPACING_RANGE, embed_settings_for_training, parse_spacing_range
    from nnunet_ape.pretrain.views import PAPER_SPACING_RANGE

    assert parse_spacing_range("paper") == PAPER_SPACING_RANGE and parse_spacing_range("coarse") == COARSE_SPACING_RANGE
    assert parse_spacing_range("3,3,4.5:4,4,6") == ((3.0, 3.0, 4.5), (4.0, 4.0, 6.0))
    for bad in ("3,3:4,4", "4,4,6:3,3,4", "fine", "0,1,1:1,1,1"):
        with pytest.raises(InputError, match="--spacing"):
            parse_spacing_range(bad)
    # the paper's views embed with the paper's defaults; coarse, smaller views at their middle spacing
    assert embed_settings_for_training(BatchConfig()) == {"spacing": [1.5, 1.5, 2.25], "patch_size": [128, 128, 96]}
    coarse = embed_settings_for_training(BatchConfig(patch_volume=300_000, spacing_range=COARSE_SPACING_RANGE))
    assert coarse == {"spacing": [4.5, 4.5, 6.75], "patch_size": [112, 112, 80]}


def test_bad_max_scan_fraction_is_refused_before_any_work(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(_cli("pretrain", "ape", "-i", str(tmp_path), "-o", str(run), "--max-scan-fraction", "1.5"),
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--max-scan-fraction 1.5: must lie in [0, 1]" in result.stderr
    assert not run.exists()


def test_training_threads_leave_cores_to_the_data_workers(monkeypatch):
    from nnunet_ape import threads

    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert threads.threads_per_process(workers=2) == 6
    assert threads.threads_per_process(2, workers=2) == 2  # torchrun: 2 processes share 8 cores
    assert threads.threads_per_process(workers=16) == 1


def test_run_trains_with_its_threads_and_gives_the_caller_its_own_back(tmp_path, monkeypatch, capsys):
    from nnunet_ape import threads

    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(5)), raising=False)
    session_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the caller's own setting, unlike the run's
    cfg = PretrainConfig(iterations=3, model="tiny", device="cpu", workers=1, checkpoint_every=10,
                         batch=BatchConfig(variant="naive", pairs=2, voxels=256, patch_volume=20_000))
    pretrain_ape(real_patients()[:1], tmp_path / "run", cfg)
    assert "4 torch thread(s) + 1 data worker(s)" in capsys.readouterr().out  # 5 cores, 1 worker
    after = torch.get_num_threads()
    torch.set_num_threads(session_threads)
    assert after == 1
