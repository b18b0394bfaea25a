"""The APE network: the paper's structure, any input size, normalized output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nnunet_ape.models.ape import PRESETS, APEConfig, APENet, count_parameters


def test_structure_follows_the_paper():
    model = APENet(PRESETS["tiny"])
    first = model.stem[0]
    assert isinstance(first, nn.Conv3d) and first.stride == (4, 4, 4)
    assert isinstance(model.norm, nn.BatchNorm3d) and not model.norm.affine
    assert model.norm.num_features == 3


@pytest.mark.parametrize("size", [(37, 50, 29), (16, 16, 16), (9, 70, 33)])
def test_any_input_size_gives_a_map_of_the_same_size(size):
    model = APENet(PRESETS["tiny"]).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, *size))
    assert out.shape == (2, 3, *size)
    assert torch.isfinite(out).all()


def test_training_mode_embeddings_have_zero_mean_unit_std_per_channel():
    model = APENet(PRESETS["tiny"]).train()
    seen = {}
    model.norm.register_forward_hook(lambda module, inputs, output: seen.update(out=output))
    model(torch.randn(2, 1, 32, 32, 32))  # divisible size: no padding, the BatchNorm sees every voxel
    out = seen["out"]  # at stride 4, before the trilinear upsampling
    mean, std = out.mean(dim=(0, 2, 3, 4)), out.std(dim=(0, 2, 3, 4), correction=0)
    assert torch.allclose(mean, torch.zeros(3), atol=1e-4)
    assert torch.allclose(std, torch.ones(3), atol=0.02)


def test_presets_grow_and_config_round_trips():
    counts = [count_parameters(APENet(PRESETS[k])) for k in ("tiny", "small", "base")]
    assert counts == sorted(counts) and counts[-1] > 10_000_000
    config = APEConfig(widths=(4, 8), convs_per_level=3)
    assert APEConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("size", [(37, 50, 29), (32, 32, 32)])
def test_reading_points_equals_reading_the_full_map(size):
    """Pretraining's shortcut (the map read at the points from its stride-4 values) gives the full map's numbers
    and gradients, at the borders too, where the upsampling repeats the last voxel and reading pads with zeros."""
    from nnunet_ape.pretrain.loss import sample_embeddings

    torch.manual_seed(0)
    model = APENet(PRESETS["tiny"]).train()
    x = torch.randn(2, 1, *size)
    top = torch.tensor(size, dtype=torch.float32) - 1
    inside = torch.rand(2, 300, 3) * top
    edges = torch.stack([torch.zeros(3), top, top - 0.3, torch.full((3,), 0.4), torch.tensor([0.0, top[1].item(), 1.5])])
    points = torch.cat([inside, edges.expand(2, -1, -1)], 1)

    full = sample_embeddings(model(x), points)
    full.pow(2).sum().backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    read = model(x, points)
    read.pow(2).sum().backward()

    assert read.shape == (2, points.shape[1], 3)
    assert torch.allclose(read, full, atol=1e-5), (read - full).abs().max()
    # one vector: the head's bias, which the non-affine BatchNorm cancels, has a gradient of rounding noise only
    grads, expected = torch.cat([p.grad.flatten() for p in model.parameters()]), torch.cat([g.flatten() for g in full_grads])
    assert (grads - expected).norm() < 1e-4 * expected.norm()
