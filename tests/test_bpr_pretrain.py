"""BPR pretraining on real CT (issue 4, first part): the loss falls, scores rise from feet to head, runs resume."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from conftest import patient, real_patients
from nnunet_ape.bpr.slices import axial_slices
from nnunet_ape.bpr.train_bpr import BPR_FORMAT, BPRConfig, pretrain_bpr
from nnunet_ape.checkpoint import load_checkpoint
from nnunet_ape.io import read_volume, to_canonical
from nnunet_ape.models.bpr import BPRNet


def _config(iterations: int) -> BPRConfig:
    # no slice augmentation: it slows the first few hundred iterations; tests/test_bpr_augment.py covers it
    return BPRConfig(iterations=iterations, lr=1e-3, trunk="tiny", device="cpu", workers=2, checkpoint_every=100, augment="none")


def _rows(run):
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_bpr_loss_falls_on_real_patients(bpr_run):  # bpr_run: conftest's 300-iteration run, as _config(300)
    rows = _rows(bpr_run)
    assert [int(r["iteration"]) for r in rows] == list(range(1, 301))
    losses = [float(r["loss"]) for r in rows]
    first, last = np.mean(losses[:30]), np.mean(losses[-30:])
    print(f"BPR tiny, patients A-E: loss {first:.3f} (first 30) -> {last:.3f} (last 30)")
    assert last < 0.85 * first
    assert (bpr_run / "loss.png").exists()


@pytest.mark.parametrize("key", ["A", "C", "D"])
def test_scores_rise_from_feet_to_head(bpr_run, key):
    state = load_checkpoint(bpr_run / "checkpoint_final.pt", BPR_FORMAT)
    model = BPRNet(state["model_config"]["trunk"])
    model.load_state_dict(state["model"])
    volume = read_volume(patient(key))
    n = to_canonical(volume)[0].shape[2]
    with torch.no_grad():
        scores = model.eval()(axial_slices(volume, list(range(n)))).numpy()
    rho = spearmanr(np.arange(n), scores).correlation
    print(f"patient {key}: Spearman correlation of slice score with z = {rho:.3f}")
    assert rho > 0.8


def test_bpr_run_resumes(tmp_path):
    run = tmp_path / "run"
    pretrain_bpr(real_patients()[:2], run, BPRConfig(**{**_config(20).__dict__, "checkpoint_every": 10}))
    pretrain_bpr(real_patients()[:2], run, BPRConfig(**{**_config(30).__dict__, "checkpoint_every": 10}), resume=True)
    assert [int(r["iteration"]) for r in _rows(run)] == list(range(1, 31))
    state = load_checkpoint(run / "checkpoint_last.pt", BPR_FORMAT)
    assert state["iteration"] == 30 and {int(s["step"]) for s in state["optimizer"]["state"].values()} == {30}
