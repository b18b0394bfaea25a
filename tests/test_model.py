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
