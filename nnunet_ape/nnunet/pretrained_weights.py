"""``-pretrained_weights`` for our trainers, two transfers (the trainer's ``pretrained_transfer``):

- ``"all"``: every weight but the segmentation heads, into a network with the same or more input channels: the CT
  weights are copied, the weights of the new (embedding) input channels start at zero, so the network first computes
  exactly what the pretrained one did (:func:`load_pretrained_weights_adding_channels`). nnU-Net's own loader
  (``nnunetv2.run.load_pretrained_weights``) refuses any shape difference (its issue #2252); for equal shapes this
  does exactly what nnU-Net's does.
- ``"encoder"``: the encoder and stem only, as nnU-Net's nnssl fine-tuning (``PretrainedTrainer.load_pretrained_weights``
  on nnU-Net's GitHub main) takes them from an nnssl checkpoint: the weights named by the checkpoint's
  ``nnssl_adaptation_plan`` (``key_to_encoder``, ``key_to_stem``) go to the network's own encoder and stem, the
  decoder and heads keep their fresh initialisation, and a 1-channel input projection (``keys_to_in_proj``) is
  repeated over C input channels and divided by C (:func:`load_pretrained_encoder`).

The trainers put the chosen loader in place of ``load_pretrained_weights`` in ``nnunetv2.run.run_training`` (the only
caller) when they initialize (:func:`install_in_nnunet`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nnunet_ape.nnunet.nnssl_plan import network_keys

SKIPPED = (".seg_layers.",)  # as nnU-Net: the segmentation heads are never transferred


def unwrapped_network(network: nn.Module) -> nn.Module:
    """The network itself inside nnU-Net's wrappers (DistributedDataParallel, then torch.compile's
    OptimizedModule), or ``network`` when it is not wrapped."""
    from torch._dynamo import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel

    module = network.module if isinstance(network, DistributedDataParallel) else network
    return module._orig_mod if isinstance(module, OptimizedModule) else module


def _mark(module: nn.Module, fname: str) -> None:
    module.nnunet_ape_pretrained_from = str(fname)


def loaded_from(network: nn.Module) -> str | None:
    """The checkpoint one of these loaders put into ``network`` (compiled or DDP-wrapped or not), or None."""
    return getattr(unwrapped_network(network), "nnunet_ape_pretrained_from", None)


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
    module = unwrapped_network(network)
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
    _mark(module, fname)
    print(f"nnunet-ape: loaded pretrained weights from {fname}" + (f"; {len(widened)} input weight(s) widened with zero "
          f"weights for the added channels: {', '.join(widened)}" if widened else ""))
    if verbose:
        for key in loaded:
            print(key, "shape", tuple(loaded[key].shape))
    return widened


def _under(key: str, prefix: str) -> str | None:
    """The rest of state-dict ``key`` after module path ``prefix`` (``"a.b.c"`` under ``"a.b"`` -> ``"c"``); None
    when ``key`` is not inside that module."""
    return key[len(prefix) + 1:] if key.startswith(prefix + ".") else None


def _mapped_key(key: str, source: dict, target: dict) -> str | None:
    """Pretrained ``key`` -> the network's key for the same weight: inside the source stem -> inside the target
    stem, else inside the source encoder -> inside the target encoder; None outside both (decoder, heads).
    source, target: ``{key_to_encoder, key_to_stem, ...}`` of the checkpoint and of the network."""
    for part in ("key_to_stem", "key_to_encoder"):
        rest = _under(key, source[part])
        if rest is not None:
            return f"{target[part]}.{rest}"
    return None


def repeat_input_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A 1-input-channel convolution weight ``(out, 1, *kernel)`` -> ``(out, channels, *kernel)``, repeated and
    divided by ``channels`` (nnssl's fine-tuning: the same response to an image repeated over all channels)."""
    return weight.repeat(1, channels, *[1] * (weight.ndim - 2)) / channels


def encoder_weights(pretrained: dict[str, torch.Tensor], plan: dict | None,
                    network: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The encoder and stem weights of ``pretrained`` (a state dict) under ``network``'s own names, and the names of
    those whose 1-channel input projection was repeated over the network's input channels. plan: the checkpoint's
    ``nnssl_adaptation_plan`` (its keys locate the weights); None: the checkpoint is ``network``'s architecture (its
    keys are used for both). RuntimeError when the network does not name its encoder, a weight of its encoder or stem
    is missing, or a shape differs otherwise than a 1-channel input projection into C channels."""
    target = network_keys(network)
    if target is None:
        raise RuntimeError(f"{type(network).__name__} does not name its encoder (key_to_encoder, key_to_stem, "
                           f"keys_to_in_proj); encoder-only transfer needs a dynamic_network_architectures network")
    source = {k: plan[k] for k in ("key_to_encoder", "key_to_stem", "keys_to_in_proj")} if plan else target
    in_proj = {_mapped_key(f"{k}.weight", source, target) for k in source["keys_to_in_proj"]}
    model = network.state_dict()
    out, repeated = {}, []
    for key, value in pretrained.items():
        mapped = _mapped_key(key, source, target)
        if mapped is None:
            continue
        if mapped not in model:
            raise RuntimeError(f"pretrained weight {key} has no place {mapped} in the network's encoder")
        if mapped in in_proj and value.shape != model[mapped].shape and value.shape[1] == 1:
            value = repeat_input_channels(value, model[mapped].shape[1])
            repeated.append(mapped)
        if value.shape != model[mapped].shape:
            raise RuntimeError(f"pretrained weight {key} has shape {tuple(value.shape)}, the network's {mapped} "
                               f"{tuple(model[mapped].shape)}; only a 1-channel input projection may be repeated")
        out[mapped] = value
    missing = [k for k in model if k not in out and any(_under(k, target[part]) is not None
                                                        for part in ("key_to_encoder", "key_to_stem"))]
    if missing:
        raise RuntimeError(f"the checkpoint lacks {len(missing)} encoder/stem weight(s) of the network, e.g. {missing[0]}")
    return out, repeated


def load_pretrained_encoder(network: nn.Module, fname: str, verbose: bool = False) -> list[str]:
    """Load only the encoder and stem of checkpoint ``fname`` into ``network`` (:func:`encoder_weights`, with the
    checkpoint's ``nnssl_adaptation_plan`` when it has one); the decoder and segmentation heads keep their weights.
    Returns the names of the input projections repeated over the network's input channels (as
    :func:`load_pretrained_weights_adding_channels` returns the widened ones)."""
    import torch.distributed as dist

    location = torch.device("cuda", dist.get_rank()) if dist.is_initialized() else torch.device("cpu")
    checkpoint = torch.load(fname, map_location=location, weights_only=False)
    module = unwrapped_network(network)
    weights, repeated = encoder_weights(checkpoint["network_weights"], checkpoint.get("nnssl_adaptation_plan"), module)
    unexpected = module.load_state_dict(weights, strict=False).unexpected_keys
    assert not unexpected, unexpected  # encoder_weights names only the network's own keys
    _mark(module, fname)
    print(f"nnunet-ape: encoder-only transfer from {fname}: {len(weights)} encoder/stem weights loaded, the decoder "
          f"and heads start fresh" + (f"; input projection repeated over {weights[repeated[0]].shape[1]} channels: "
                                      f"{', '.join(repeated)}" if repeated else ""))
    if verbose:
        for key, value in weights.items():
            print(key, "shape", tuple(value.shape))
    return repeated


LOADERS: dict[str, Callable[..., list[str]]] = {"all": load_pretrained_weights_adding_channels,
                                                "encoder": load_pretrained_encoder}


def install_in_nnunet(transfer: str = "all") -> None:
    """Make ``nnUNetv2_train -pretrained_weights`` use the loader of ``transfer`` (``"all"``:
    :func:`load_pretrained_weights_adding_channels`, ``"encoder"``: :func:`load_pretrained_encoder`)."""
    import nnunetv2.run.run_training as run_training

    if transfer not in LOADERS:
        raise ValueError(f"pretrained_transfer must be one of {', '.join(LOADERS)}, not {transfer!r}")
    run_training.load_pretrained_weights = LOADERS[transfer]
