"""``-pretrained_weights`` into a network with more input channels: the CT weights are copied, the weights of the new
(embedding) input channels start at zero, so the network first computes exactly what the pretrained one did.

nnU-Net's own loader (``nnunetv2.run.load_pretrained_weights``) refuses any shape difference (its issue #2252).
The APE trainers put :func:`load_pretrained_weights_adding_channels` in its place in ``nnunetv2.run.run_training``
(the only caller) when they initialize; for equal shapes it does exactly what nnU-Net's does.
"""

from __future__ import annotations

import torch
from torch import nn

SKIPPED = (".seg_layers.",)  # as nnU-Net: the segmentation heads are never transferred


def _module(network: nn.Module) -> nn.Module:
    from torch._dynamo import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel

    module = network.module if isinstance(network, DistributedDataParallel) else network
    return module._orig_mod if isinstance(module, OptimizedModule) else module


def widen_input_channels(pretrained: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """``pretrained`` grown along dim 1 (input channels) to ``target``'s shape, new channels zero; None when the
    shapes differ otherwise."""
    if pretrained.shape == target.shape:
        return pretrained
    if pretrained.ndim < 2 or pretrained.shape[0] != target.shape[0] or pretrained.shape[2:] != target.shape[2:] \
            or pretrained.shape[1] > target.shape[1]:
        return None
    out = torch.zeros(target.shape, dtype=pretrained.dtype, device=pretrained.device)
    out[:, : pretrained.shape[1]] = pretrained
    return out


def load_pretrained_weights_adding_channels(network: nn.Module, fname: str, verbose: bool = False) -> list[str]:
    """Load an nnU-Net checkpoint's ``network_weights`` into ``network`` (segmentation heads excepted), widening
    input-channel convolutions with zero weights. Every other weight must match by name and shape (as in
    nnU-Net). Returns the names of the widened weights."""
    import torch.distributed as dist

    location = torch.device("cuda", dist.get_rank()) if dist.is_initialized() else torch.device("cpu")
    pretrained = torch.load(fname, map_location=location, weights_only=False)["network_weights"]
    module = _module(network)
    model = module.state_dict()
    widened, loaded = [], {}
    for key, value in model.items():
        if any(s in key for s in SKIPPED):
            continue
        if key not in pretrained:
            raise RuntimeError(f"{fname}: weight {key} is missing; the pretrained network is not this architecture")
        fitted = widen_input_channels(pretrained[key].to(value.device), value)
        if fitted is None:
            raise RuntimeError(f"{fname}: weight {key} has shape {tuple(pretrained[key].shape)}, the network "
                               f"{tuple(value.shape)}; only input channels may be added")
        if fitted is not pretrained[key] and fitted.shape != pretrained[key].shape:
            widened.append(key)
        loaded[key] = fitted
    model.update(loaded)
    module.load_state_dict(model)
    print(f"nnunet-ape: loaded pretrained weights from {fname}" + (f"; {len(widened)} input weight(s) widened with zero "
          f"weights for the added channels: {', '.join(widened)}" if widened else ""))
    if verbose:
        for key in loaded:
            print(key, "shape", tuple(loaded[key].shape))
    return widened


def install_in_nnunet() -> None:
    """Make ``nnUNetv2_train -pretrained_weights`` use :func:`load_pretrained_weights_adding_channels`."""
    import nnunetv2.run.run_training as run_training

    run_training.load_pretrained_weights = load_pretrained_weights_adding_channels
