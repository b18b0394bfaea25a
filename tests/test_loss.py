"""The paper's losses on cases with known answers."""

from __future__ import annotations

import torch

from nnunet_ape.pretrain.loss import (
    ape_loss,
    distance_loss,
    equivariance_loss,
    normalize_positions,
    pairwise_distances,
    sample_embeddings,
)


def test_pairwise_distances_match_cdist():
    a, b = torch.randn(50, 3), torch.randn(40, 3)
    assert torch.allclose(pairwise_distances(a, b), torch.cdist(a, b), atol=1e-3)


def test_normalized_positions_have_zero_mean_unit_std():
    p = torch.rand(500, 3) * torch.tensor([300.0, 200.0, 50.0]) + 1000
    q = normalize_positions(p)
    assert torch.allclose(q.mean(0), torch.zeros(3), atol=1e-4)
    assert torch.allclose(q.std(0), torch.ones(3), atol=1e-2)


def test_distance_loss_is_zero_for_embeddings_equal_to_normalized_positions():
    p = torch.rand(200, 3) * 300
    target = normalize_positions(p)
    assert distance_loss(target, target, p) < 1e-6
    # any rotation of the target is as good: only distances count
    q, _ = torch.linalg.qr(torch.randn(3, 3))
    assert distance_loss(target @ q, target @ q, p) < 1e-5
    assert distance_loss(torch.randn(200, 3), torch.randn(200, 3), p) > 0.5


def test_distance_loss_matches_the_formula_by_hand():
    a = torch.tensor([[0.0, 0, 0], [1.0, 0, 0]])
    b = torch.tensor([[0.0, 0, 0], [3.0, 0, 0]])
    p = torch.tensor([[0.0, 0, 0], [10.0, 0, 0]])
    # p^ along x: (-1, 1) (unit std per axis), others 0 -> d_true = [[0, 2], [2, 0]]
    # d_pred(i, j) = |a_i - b_j| = [[0, 3], [1, 2]] -> errors^2 = [0, 1, 1, 4] -> mean 1.5
    assert torch.isclose(distance_loss(a, b, p), torch.tensor(1.5), atol=1e-3)


def test_equivariance_loss_is_mean_squared_norm():
    a = torch.zeros(4, 3)
    b = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 0], [1.0, 1.0, 1.0]])
    assert torch.isclose(equivariance_loss(a, b), torch.tensor((1 + 4 + 0 + 3) / 4))


def test_sample_embeddings_reads_maps_at_continuous_voxel_indices():
    x, y, z = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), torch.arange(8.0), indexing="ij")
    maps = torch.stack([x, y, 2 * z])[None]  # (1, 3, 6, 7, 8)
    coords = torch.tensor([[[0.0, 0.0, 0.0], [2.5, 3.25, 7.0], [5.0, 6.0, 0.5]]])
    values = sample_embeddings(maps, coords)
    expected = coords.clone()
    expected[..., 2] *= 2
    assert torch.allclose(values, expected, atol=1e-5)


def test_variants_and_gradients_are_finite_with_coincident_points():
    maps = torch.randn(4, 3, 8, 8, 8, requires_grad=True)
    coords = torch.full((4, 5, 3), 3.0)  # every point at the same place: zero distances
    for variant in ("naive", "aug", "equiv"):
        positions = torch.rand(4 if variant == "naive" else 2, 5, 3)  # n views (naive) or n pairs
        loss, parts = ape_loss(maps, coords, positions, variant, equiv_weight=1.0)
        loss.backward()
        assert torch.isfinite(maps.grad).all()
        assert ("equiv" in parts) == (variant == "equiv")
        maps.grad = None
