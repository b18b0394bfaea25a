"""Axes and points of the nnU-Net APE pretraining trainer, without training: which patient axis each preprocessed
array axis runs along, the adapter that runs such a network on canonical volumes, and positive pairs found
through position channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_ape.nnunet.ape_checkpoint import NNUNetAPE
from nnunet_ape.nnunet.pretrain_trainer import network_axes
from nnunet_ape.pretrain.position_channels import affine_fit, matched_points, position_channel_loss


def test_network_axes_of_lps_and_ras_images():
    # SimpleITK arrays are (k, j, i): array axis 0 runs along the image's third index axis
    assert network_axes(np.eye(3), [0, 1, 2]) == [(2, False), (1, False), (0, False)]
    assert network_axes(np.diag([-1.0, -1.0, 1.0]), [0, 1, 2]) == [(2, False), (1, True), (0, True)]
    assert network_axes(np.eye(3), [2, 0, 1]) == [(0, False), (2, False), (1, False)]


class IndexNetwork(nn.Module):
    """Outputs, per voxel, its index along each of the input's three array axes (a perfect positional embedding in
    the network's own axes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in x.shape[2:]), indexing="ij")
        return torch.stack(grids)[None].expand(x.shape[0], -1, -1, -1, -1)


@pytest.mark.parametrize("axes", [[(2, False), (1, False), (0, False)], [(2, False), (1, True), (0, True)],
                                  [(0, True), (2, False), (1, True)]])
def test_adapter_returns_channel_c_along_canonical_axis_c(axes):
    model = NNUNetAPE(IndexNetwork(), axes, torch.zeros(3), torch.ones(3) - 1e-5, ("CTNormalization", {}), [1, 1, 1])
    out = model(torch.zeros(1, 1, 5, 6, 7))[0]
    assert out.shape == (3, 5, 6, 7)
    for c in range(3):
        steps = out[c].diff(dim=c)
        assert torch.allclose(steps, torch.ones_like(steps), atol=1e-4)  # increases by one voxel along its own axis
        for other in {0, 1, 2} - {c}:
            assert torch.allclose(out[c].diff(dim=other), torch.zeros(1), atol=1e-5)


def test_adapter_pads_to_the_network_divisor_and_crops_back():
    seen = []

    class Recorder(IndexNetwork):
        def forward(self, x):
            seen.append(tuple(x.shape[2:]))
            return super().forward(x)

    model = NNUNetAPE(Recorder(), [(2, False), (1, False), (0, False)], torch.zeros(3), torch.ones(3), ("CTNormalization", {}), [4, 8, 8])
    assert model(torch.zeros(1, 1, 9, 10, 11)).shape == (1, 3, 9, 10, 11)
    assert seen == [(12, 16, 16)]  # canonical (9, 10, 11) is array (11, 10, 9), padded to multiples of (4, 8, 8)


def _view(start: np.ndarray, shape=(12, 12, 12), rotation: float = 0.0) -> torch.Tensor:
    """Position channels of a view rotated by ``rotation`` rad about axis 0, first voxel at ``start`` mm, 2 mm voxels,
    inside everywhere."""
    c, s = np.cos(rotation), np.sin(rotation)
    matrix = 2.0 * np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1).reshape(-1, 3)
    positions = (index @ matrix.T + start).T.reshape(3, *shape)
    return torch.from_numpy(np.concatenate([positions, np.ones((1, *shape))]).astype(np.float32))


def test_affine_fit_recovers_the_view_geometry():
    view = _view(np.array([10.0, 20.0, 30.0]), rotation=0.3)
    matrix, offset = affine_fit(view[:3], view[3] > 0.5)
    assert torch.allclose(offset, torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64), atol=1e-3)
    assert torch.allclose(matrix.T @ torch.tensor([1.0, 0, 0], dtype=torch.float64), torch.tensor([2.0, 0, 0], dtype=torch.float64), atol=1e-4)


def test_matched_points_are_the_same_physical_points():
    first, second = _view(np.zeros(3)), _view(np.array([6.0, -4.0, 2.0]), rotation=0.2)
    second[3, :, :3] = 0  # part of the second view lies outside its scan
    pairs = matched_points(torch.stack([first, second]), 500)
    assert len(pairs) == 1
    pair, coords_first, coords_second, positions = pairs[0]
    assert pair == 0 and len(coords_first) >= 8
    from nnunet_ape.pretrain.loss import sample_embeddings

    in_second = sample_embeddings(second[None, :3], coords_second[None])[0]
    assert torch.allclose(in_second, positions, atol=1e-2)  # the same mm in the second view
    assert (coords_second[:, 1] >= 3 - 1e-4).all()  # never where the second view is outside its scan
    # a disjoint partner gives no pairs, and the loss falls back to the views on their own
    far = _view(np.array([500.0, 0.0, 0.0]))
    assert matched_points(torch.stack([first, far]), 100) == []
    embeddings = torch.randn(2, 3, 12, 12, 12, requires_grad=True)
    loss, parts = position_channel_loss(embeddings, torch.stack([first, far]), "equiv", points=200)
    assert set(parts) == {"loss", "dist"} and loss.requires_grad
