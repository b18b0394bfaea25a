"""The few-label benchmark's APE starts (benchmarks/finetune_starts.py): every convolution that a norm follows
scaled back to the weight norm nnU-Net's initialisation gives it (``ape_rescaled``), or each of its output
channels to the output spread of a freshly initialised network on a batch (``ape_matched``); both leave the
network's function unchanged. And the decoder end's two re-initialisations."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import finetune_starts as ft  # noqa: E402


def _unet(architecture: str) -> torch.nn.Module:
    """A small nnU-Net U-Net (InstanceNorm, LeakyReLU, deep supervision) with nnU-Net's initialisation, its weights
    then grown as a pretraining might grow them (each convolution by its own factor, 1-3x)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
    from nnunetv2.utilities.network_initialization import InitWeights_He

    common = dict(input_channels=1, n_stages=3, features_per_stage=[8, 16, 32], conv_op=torch.nn.Conv3d,
                  kernel_sizes=3, strides=[1, 2, 2], num_classes=3, n_conv_per_stage_decoder=[1, 1], conv_bias=True,
                  norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                  nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
    if architecture == "PlainConvUNet":
        network = PlainConvUNet(n_conv_per_stage=[2, 2, 2], **common)
    else:
        network = ResidualEncoderUNet(n_blocks_per_stage=[1, 1, 1], **common)
    network.apply(InitWeights_He(1e-2))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.modules.conv._ConvNd):
                factor = 1 + 2 * float(torch.rand(1, generator=generator))
                module.weight.mul_(factor)
                if module.bias is not None:
                    module.bias.add_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return network


@pytest.mark.parametrize("architecture", ["PlainConvUNet", "ResidualEncoderUNet"])
def test_rescaling_restores_the_initial_norms_and_keeps_the_function(architecture):
    network = _unet(architecture).eval()
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = [o.clone() for o in network(x)]
    normed = {id(m.conv) for m in network.modules() if getattr(m, "conv", None) is not None and getattr(m, "norm", None) is not None}
    untouched = {name: p.clone() for name, p in network.named_parameters()
                 if not any(p is c.weight or p is c.bias for c in network.modules() if id(c) in normed)}

    factors = ft.rescale_to_init_norms(network)

    assert len(factors) == len(normed) > 0 and all(0.2 < f < 1.0 for f in factors)  # every grown conv shrunk back
    for module in network.modules():
        if id(module) in normed:
            assert float(module.weight.detach().norm()) == pytest.approx(ft.he_norm(module.weight), rel=1e-5)
    with torch.no_grad():
        after = network(x)
    for a, b in zip(before, after):  # deep supervision: every resolution's output
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # float32 rounding, not a changed function
    for name, p in network.named_parameters():  # transposed convolutions, heads and norms keep their weights
        if name in untouched:
            assert torch.equal(p, untouched[name]), name
    assert any("transpconvs" in n for n in untouched) and any("seg_layers" in n for n in untouched)


def test_he_norm_is_the_norm_of_nnunets_initialisation():
    from nnunetv2.utilities.network_initialization import InitWeights_He

    conv = torch.nn.Conv3d(32, 64, 3)
    torch.manual_seed(0)
    InitWeights_He(1e-2)(conv)
    assert float(conv.weight.detach().norm()) == pytest.approx(ft.he_norm(conv.weight), rel=0.02)


@pytest.mark.parametrize("nnunet_init", [False, True])
def test_the_decoder_end_restarts_from_pytorchs_or_nnunets_initialisation(nnunet_init):
    network = _unet("PlainConvUNet")
    torch.manual_seed(0)
    assert ft.reinit_decoder_end(network, nnunet_init=nnunet_init) > 0
    convs = [m.conv for m in network.decoder.stages[-1].modules() if getattr(m, "conv", None) is not None]
    ratios = [float(c.weight.detach().norm()) / ft.he_norm(c.weight) for c in convs]
    assert convs and all(abs(r - 1) < 0.1 if nnunet_init else r < 0.6 for r in ratios)  # PyTorch's default: about 0.41
    assert all(float(head.bias.detach().abs().max()) == 0.0 for head in network.decoder.seg_layers) == nnunet_init


def test_the_reference_copy_is_nnunet_initialised_and_leaves_the_network_and_torchs_stream_alone():
    network = _unet("PlainConvUNet")
    with torch.no_grad():  # pretrained norms: affine parameters away from nnU-Net's 1 and 0
        for module in network.modules():
            if isinstance(module, torch.nn.InstanceNorm3d):
                module.weight.fill_(1.5), module.bias.fill_(-0.2)
    weights = {name: p.clone() for name, p in network.state_dict().items()}
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)

    reference = ft.nnunet_initialised_copy(network)

    assert torch.equal(torch.rand(3), expected)  # the caller's draws are not shifted
    assert all(torch.equal(p, weights[name]) for name, p in network.state_dict().items())
    convs = [c for _, c in ft.normed_convs(reference)]
    assert convs and all(abs(float(c.weight.detach().norm()) / ft.he_norm(c.weight) - 1) < 0.15 for c in convs)
    norms = {name: p for name, p in reference.state_dict().items() if ".norm." in name}
    assert norms and all(torch.equal(p, weights[name]) for name, p in norms.items())  # affine parameters kept


@pytest.mark.parametrize("architecture", ["PlainConvUNet", "ResidualEncoderUNet"])
def test_matching_the_output_spread_keeps_the_function_and_equalises_every_channel(architecture):
    from nnunetv2.utilities.network_initialization import InitWeights_He

    network = _unet(architecture).eval()
    torch.manual_seed(3)
    reference = _unet(architecture).apply(InitWeights_He(1e-2)).eval()
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = [o.clone() for o in network(x)]
    target = ft.output_spread(reference, x)
    assert any(float((s.max() - s.min()) / s.mean()) > 0.05 for s in ft.output_spread(network, x).values())

    factors = ft.match_output_spread(network, reference, x)

    assert len(factors) == len(ft.normed_convs(network)) and all(f > 0 for f in factors)
    for name, spread in ft.output_spread(network, x).items():  # every channel now spreads as the reference's mean
        torch.testing.assert_close(spread, target[name].mean().expand_as(spread), rtol=1e-3, atol=1e-6)
    with torch.no_grad():
        after = network(x)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # float32 rounding, not a changed function


def test_the_matched_start_takes_one_batch_from_the_loader_and_leaves_the_random_streams_alone():
    import random
    from types import SimpleNamespace

    import numpy as np

    import finetune_trainers

    trainer_class = finetune_trainers.trainer_classes()["nnUNetTrainerFinetuneAPEMatched"]
    network = _unet("PlainConvUNet")
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    made = []

    class _Loader:  # nnU-Net's data loader inside its augmenter: each batch draws from the global streams
        def generate_train_batch(self) -> dict:
            made.append((random.random(), np.random.rand(), torch.rand(1)))
            return {"data": x.numpy()}

    fake = SimpleNamespace(dataloader_train=SimpleNamespace(generator=_Loader()), device=torch.device("cpu"),
                           bench={"compile": False})
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    with torch.no_grad():
        before = [o.clone() for o in network(x)]

    factors = trainer_class._match_spread(fake, network)

    assert len(made) == 1 and len(factors) == len(ft.normed_convs(network))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected  # the run's own draws are not shifted
    spreads = ft.output_spread(network, x)
    assert all(float(s.std() / s.mean()) < 1e-3 for s in spreads.values())  # every channel at its layer's target
    with torch.no_grad():
        for a, b in zip(before, network(x)):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_the_probe_measures_how_much_of_the_pretrained_weights_a_network_keeps():
    """finetune_start_probe.weight_cosines: 1 for the pretrained network itself, still above 0.9 after the matched
    start's per-channel scaling, about 0 for an independently initialised network."""
    import copy

    from finetune_start_probe import weight_cosines

    pretrained = _unet("PlainConvUNet")
    assert weight_cosines(pretrained, pretrained) == pytest.approx([1.0] * len(ft.normed_convs(pretrained)), abs=1e-5)
    matched = copy.deepcopy(pretrained)
    ft.match_output_spread(matched, ft.nnunet_initialised_copy(matched), torch.randn(2, 1, 16, 16, 16))
    kept = weight_cosines(matched, pretrained)
    assert min(kept) > 0.9 and max(kept) < 1.0 + 1e-6 and min(kept) < 0.9999  # scaled per channel, so not exactly 1
    torch.manual_seed(3)
    unrelated = weight_cosines(_unet("PlainConvUNet").apply(_reinit_he), pretrained)
    assert max(abs(c) for c in unrelated) < 0.3


def _reinit_he(module: torch.nn.Module) -> None:
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        torch.nn.init.kaiming_normal_(module.weight, a=1e-2)
