"""The few-label benchmark's linear probe (benchmarks/finetune_feature_probe.py): a softmax regression on encoder
features, scored by Dice per organ; it must tell features that carry the labels from features that do not."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import finetune_feature_probe as probe  # noqa: E402


def _labels(seed: int) -> torch.Tensor:
    """A (16, 16, 16) label patch: background, a big block of label 1 and a small one of label 2."""
    y = torch.zeros(16, 16, 16, dtype=torch.long)
    y[2:10, 2:10, 2:10] = 1
    o = seed % 4
    y[11 + o // 2:14 + o // 2, 11:14, 3 + o:6 + o] = 2
    return y


def _informative(y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Features (4, *patch): a noisy one-hot of the labels and a pure-noise channel."""
    onehot = torch.nn.functional.one_hot(y, 3).permute(3, 0, 1, 2).float()
    return torch.cat([onehot + 0.2 * torch.randn(onehot.shape, generator=generator), torch.randn((1, *y.shape), generator=generator)])


def test_the_probe_finds_labels_that_the_features_carry_and_not_in_noise():
    g = torch.Generator().manual_seed(0)
    fit_y, score_y = [_labels(s) for s in range(3)], [_labels(s) for s in range(3, 6)]
    samples = [probe.fitting_sample(_informative(y, g), y, g) for y in fit_y]
    x, labels = torch.cat([s[0] for s in samples]), torch.cat([s[1] for s in samples])
    assert x.shape == (len(labels), 4) and set(labels.tolist()) == {0, 1, 2}
    assert (labels == 2).sum() == 3 * 27  # every voxel of the small organ: fewer than FIT_VOXELS
    layer = probe.fit_probe(x, labels, 3, probe.label_frequencies(fit_y, 3))
    good = probe.probe_dice(layer, (_informative(y, g) for y in score_y), score_y, 3)
    assert min(good) > 0.9
    noise = [torch.randn((4, 16, 16, 16), generator=g) for _ in fit_y]
    samples = [probe.fitting_sample(f, y, g) for f, y in zip(noise, fit_y)]
    layer = probe.fit_probe(torch.cat([s[0] for s in samples]), torch.cat([s[1] for s in samples]), 3,
                            probe.label_frequencies(fit_y, 3))
    bad = probe.probe_dice(layer, [torch.randn((4, 16, 16, 16), generator=g) for _ in score_y], score_y, 3)
    assert max(bad) < 0.6 and bad[1] < 0.1  # the small organ: about its share of the guesses


def test_an_organ_absent_from_every_scoring_patch_is_nan_not_zero():
    y = [torch.zeros(8, 8, 8, dtype=torch.long)]
    y[0][:4] = 1
    layer = torch.nn.Linear(1, 3)
    dice = probe.probe_dice(layer, [torch.zeros(1, 8, 8, 8)], y, 3)
    assert np.isnan(dice[1]) and not np.isnan(dice[0])


def test_each_stage_and_all_stages_of_an_nnunet_encoder_are_probed():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    network = PlainConvUNet(input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=torch.nn.Conv3d,
                            kernel_sizes=3, strides=[1, 2, 2], n_conv_per_stage=[1, 1, 1], num_classes=3,
                            n_conv_per_stage_decoder=[1, 1], conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                            norm_op_kwargs={"affine": True}, nonlin=torch.nn.LeakyReLU).eval()
    ys = torch.stack([_labels(s) for s in range(4)])[:, None].float()
    xs = ys * 100 + torch.randn(ys.shape)  # the labels show in the intensity
    stages = probe.stage_features(network, xs[:1])
    assert [tuple(s.shape) for s in stages] == [(4, 16, 16, 16), (8, 8, 8, 8), (16, 4, 4, 4)]
    assert probe.on_patch_grid(stages, (16, 16, 16)).shape == (28, 16, 16, 16)
    results = probe.probe_start(network, (xs[:2], ys[:2]), (xs[2:], ys[2:]), 3)
    assert list(results) == ["stage 0", "stage 1", "stage 2", "all stages"]
    assert all(len(d) == 2 for d in results.values())
    intensity = probe.probe_start(None, (xs[:2], ys[:2]), (xs[2:], ys[2:]), 3)
    assert list(intensity) == ["intensity"] and intensity["intensity"][0] > 0.9  # label 1 is the bright block
