"""How the few-label benchmark (``headneck_finetune``) prepares an APE-initialised nnU-Net network before its first
fine-tuning step, and what SGD sees of it.

Every convolution in nnU-Net's U-Net is followed by a normalization (``ConvDropoutNormReLU``: conv, dropout, norm
and a positively homogeneous nonlinearity), so multiplying an output channel's weights and bias by a positive
factor leaves the network's function unchanged, but not its training: the gradient reaching that convolution is
divided by the spread (standard deviation over space) of its output, so SGD's relative step on it shrinks with
that spread. A pretrained filter is coherent with CT structure, so its output spreads several times more than a
randomly initialised one of the same norm: the APE start learns slowly in exactly the layers pretraining shaped.

- :func:`reinit_decoder_end`: the last decoder stage and the heads, re-initialised (``ape_reinit``);
- :func:`rescale_to_init_norms`: every such convolution back to the weight norm of nnU-Net's initialisation;
- :func:`match_output_spread`: every such output channel scaled so that its output spreads on a training batch as
  in a freshly initialised network (the data-dependent rescaling of Kraehenbuehl et al. 2016, "Data-dependent
  initializations of convolutional neural networks", per channel).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def normed_convs(network: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(module name, convolution)]`` for every convolution that a normalization follows in ``network`` (modules
    with a ``conv`` and a non-None ``norm``, as nnU-Net's ``ConvDropoutNormReLU``), in module order."""
    return [(name, m.conv) for name, m in network.named_modules()
            if isinstance(getattr(m, "conv", None), nn.modules.conv._ConvNd) and getattr(m, "norm", None) is not None]


def reinit_decoder_end(network: nn.Module, nnunet_init: bool = False) -> int:
    """Re-initialise the last decoder stage and the segmentation heads of nnU-Net's U-Net with PyTorch's default
    initialisation, or with nnU-Net's (``InitWeights_He(1e-2)`` on the convolutions, as a network from scratch
    starts); returns the number of modules reset."""
    from nnunetv2.utilities.network_initialization import InitWeights_He

    decoder = getattr(network, "decoder", None)
    if decoder is None:
        raise SystemExit("ape_reinit: the network has no 'decoder' (not nnU-Net's U-Net)")
    count = 0
    for part in (decoder.stages[-1], decoder.seg_layers):
        for module in part.modules():
            if hasattr(module, "reset_parameters") and module is not part:
                module.reset_parameters()
                if nnunet_init:
                    InitWeights_He(1e-2)(module)
                count += 1
    return count


def he_norm(weight: torch.Tensor) -> float:
    """The expected Frobenius norm of a convolution ``weight`` (out, in / groups, *kernel) under nnU-Net's
    initialisation (``InitWeights_He(1e-2)``: Kaiming normal, fan-in, negative slope 0.01)."""
    fan_in = weight[0].numel()
    std = (2.0 / (1 + 1e-2 ** 2)) ** 0.5 / fan_in ** 0.5
    return std * weight.numel() ** 0.5


def _scale(conv: nn.Module, factor: torch.Tensor | float) -> None:
    """Multiply ``conv``'s weight and bias by ``factor`` (a number, or one per output channel)."""
    factor = torch.as_tensor(factor, dtype=conv.weight.dtype, device=conv.weight.device)
    conv.weight.mul_(factor.reshape(-1, *[1] * (conv.weight.ndim - 1)) if factor.ndim else factor)
    if conv.bias is not None:
        conv.bias.mul_(factor)


def rescale_to_init_norms(network: nn.Module) -> list[float]:
    """Scale every convolution of :func:`normed_convs` (weight and bias) to the norm nnU-Net's initialisation gives
    it (:func:`he_norm`); returns the factors applied, in module order. The function is unchanged; convolutions
    without a norm after them (transposed convolutions, the heads) are left as they are."""
    factors = []
    with torch.no_grad():
        for _, conv in normed_convs(network):
            factor = he_norm(conv.weight) / float(conv.weight.norm())
            _scale(conv, factor)
            factors.append(factor)
    return factors


def nnunet_initialised_copy(network: nn.Module) -> nn.Module:
    """A deep copy of ``network`` with nnU-Net's initialisation (``InitWeights_He(1e-2)``) on every convolution,
    the reference :func:`match_output_spread` matches to. The norms' affine parameters stay ``network``'s (close to
    a freshly built network, not the same); torch's global random state is left as it was, so a run's own draws
    are not shifted."""
    from nnunetv2.utilities.network_initialization import InitWeights_He

    with torch.random.fork_rng():
        return copy.deepcopy(network).apply(InitWeights_He(1e-2))


def output_spread(network: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per convolution of :func:`normed_convs`: the standard deviation of its output over the spatial axes, per
    sample and output channel, averaged over the samples of ``batch`` (N, C, *spatial): ``{name: (out_channels,)}``.
    What the norm after it divides by, in the network's forward pass on ``batch`` (no gradient)."""
    spreads: dict[str, torch.Tensor] = {}
    hooks = [conv.register_forward_hook(
        lambda module, inputs, output, name=name: spreads.__setitem__(
            name, output.detach().float().flatten(2).std(dim=2).mean(dim=0)))
        for name, conv in normed_convs(network)]
    try:
        with torch.no_grad():
            network(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return spreads


def match_output_spread(network: nn.Module, reference: nn.Module, batch: torch.Tensor) -> list[float]:
    """Scale each output channel of every convolution of :func:`normed_convs` in ``network`` (weight and bias) so
    that its output spreads on ``batch`` (N, C, *spatial) as much as, on average over its channels, the same
    convolution's in ``reference`` (the same architecture, e.g. freshly initialised); returns each convolution's
    mean factor, in module order. The function is unchanged (the norm removes a channel's scale); the gradients
    then reach every convolution at the scale they reach ``reference``'s."""
    target = output_spread(reference, batch)
    measured = output_spread(network, batch)
    means = []
    with torch.no_grad():
        for name, conv in normed_convs(network):
            factor = target[name].mean() / measured[name].clamp_min(1e-12)
            _scale(conv, factor)
            means.append(float(factor.mean()))
    return means
