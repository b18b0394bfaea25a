"""BPR building blocks (issue 4 groundwork): trunks, losses with known answers, slices from real CT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import patient
from nnunet_ape.bpr.losses import distance_loss, heuristic_order_loss, order_loss
from nnunet_ape.bpr.slices import SLICE_MM, axial_slices, sample_equidistant
from nnunet_ape.io import read_volume, to_canonical
from nnunet_ape.models.bpr import TRUNKS, BPRNet


@pytest.mark.parametrize("trunk", sorted(TRUNKS))
def test_every_trunk_scores_slices(trunk):
    model = BPRNet(trunk).eval()
    with torch.no_grad():
        scores = model(torch.randn(3, 1, 128, 128))
    assert scores.shape == (3,) and torch.isfinite(scores).all()


def test_unknown_trunk_is_refused():
    with pytest.raises(ValueError, match="unknown trunk"):
        BPRNet("alexnet")


def test_order_loss_rewards_increasing_scores():
    up, down = torch.arange(8.0), torch.arange(8.0).flip(0)
    assert order_loss(up) < order_loss(torch.zeros(8)) < order_loss(down)
    assert order_loss(torch.zeros(8)) == pytest.approx(np.log(2), abs=1e-6)  # -log sigmoid(0)


def test_distance_loss_is_zero_for_equal_steps_only():
    assert distance_loss(torch.arange(8.0) * 3 + 1) == 0
    assert distance_loss(torch.tensor([0.0, 1.0, 3.0, 4.0])) > 0
    # by hand: steps 1, 2, 1 -> changes 1, -1 -> smooth L1 0.5 each
    assert distance_loss(torch.tensor([0.0, 1.0, 3.0, 4.0])) == pytest.approx(0.5)


def test_heuristic_order_loss_matches_sigmoids_of_differences():
    z = torch.tensor([0.0, 50.0, 100.0])
    good = heuristic_order_loss(0.02 * z, z, alpha=1.0, beta=0.02)  # alpha * dScore == beta * dZ exactly
    assert good == pytest.approx(0.0, abs=1e-9)
    assert heuristic_order_loss(-0.02 * z, z) > 0.01


def test_equidistant_sampling():
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = sample_equidistant(rng, 40, m=8)
        gaps = np.diff(idx)
        assert len(idx) == 8 and np.all(gaps == gaps[0]) and gaps[0] >= 1
        assert idx[0] >= 0 and idx[-1] < 40
    with pytest.raises(ValueError, match="at least 8"):
        sample_equidistant(rng, 5, m=8)


def test_slices_of_real_ct_have_the_reference_geometry():
    volume = read_volume(patient("A"))  # RAS-like: slices are taken in canonical order
    canon, _ = to_canonical(volume)
    slices = axial_slices(volume, [0, 56, 111])
    assert slices.shape == (3, 1, 128, 128)
    assert slices.min() >= -1 and slices.max() <= 1
    # the body's width in pixels matches its physical width at 3.5 mm per pixel
    row = canon.array[:, canon.shape[1] // 2, 56] > -500
    width_mm = (np.flatnonzero(row)[-1] - np.flatnonzero(row)[0]) * canon.spacing[0]
    body = slices[1, 0, :, 64].numpy() > (-500 + 1000) / 2500 * 2 - 1
    width_px = np.flatnonzero(body)[-1] - np.flatnonzero(body)[0]
    assert width_px * SLICE_MM == pytest.approx(width_mm, rel=0.08)
    # the middle slice of the input is the middle of the output
    assert np.allclose(slices[1, 0].numpy(), axial_slices(volume, [56])[0, 0].numpy())
