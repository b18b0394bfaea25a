"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)`` (no pickled code)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnunet_ape.atomic import atomic_path
from nnunet_ape.errors import InputError
from nnunet_ape.models.ape import APEConfig, APENet

APE_FORMAT = "nnunet-ape/ape-v1"
# nnU-Net checkpoints log numpy scalars; these are the only non-tensor types they need
NUMPY_SCALARS = [np._core.multiarray.scalar, np.dtype, np.dtypes.Float32DType, np.dtypes.Float64DType]


def save_atomic(state: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: a crash never leaves a torn file."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def _read(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found; give the .pt file written by 'nnunet-ape pretrain'")
    try:
        with torch.serialization.safe_globals(NUMPY_SCALARS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for foreign or corrupt files
        raise InputError(f"{path}: not a readable nnunet-ape checkpoint ({type(error).__name__})") from None


def load_checkpoint(path: str | os.PathLike, expected_format: str = APE_FORMAT) -> dict:
    """Load a checkpoint safely (tensors and plain containers only) and check its format tag."""
    path = Path(path)
    return _checked(_read(path), path, expected_format)


def _checked(state, path: Path, expected_format: str) -> dict:
    if not isinstance(state, dict) or state.get("format") != expected_format:
        raise InputError(f"{path}: not an {expected_format} checkpoint")
    return state


def _is_nnunet(state) -> bool:
    return isinstance(state, dict) and "network_weights" in state and "init_args" in state


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def load_ape_model(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Checkpoint file -> (APE model in eval mode on CPU, checkpoint dict). The file alone rebuilds the model.

    Takes the ``.pt`` of ``nnunet-ape pretrain ape`` (an :class:`APENet`) and the ``checkpoint_*.pth`` of nnU-Net's
    ``nnUNetTrainerAPEPretrain`` (the plans' network, :mod:`nnunet_ape.nnunet.ape_checkpoint`); for the latter the
    dict returned holds the embedding settings only. Both models take canonical volumes (``input_from_hu``).
    """
    path = Path(path)
    state = _read(path)
    if _is_nnunet(state):
        from nnunet_ape.nnunet.ape_checkpoint import ape_model_from_nnunet

        return ape_model_from_nnunet(state, str(path))
    state = _checked(state, path, APE_FORMAT)
    model = APENet(APEConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    return model.eval(), state


def load_ape_settings(path: str | os.PathLike) -> dict:
    """The checkpoint dict of an APE model (``embed`` settings, format, ...) without building the network where the
    file says it all (our ``.pt``); an nnU-Net checkpoint is read through :func:`load_ape_model`."""
    path = Path(path)
    state = _read(path)
    return load_ape_model(path)[1] if _is_nnunet(state) else _checked(state, path, APE_FORMAT)


def file_hash(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file (to tie derived files to the checkpoint they came from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
