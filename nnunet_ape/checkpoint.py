"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)`` (no pickled code).

APE models come from our own ``.pt`` files, or from other checkpoint formats through readers registered with
:func:`register_checkpoint_reader`. This module imports no reader: the nnU-Net subpackage registers the reader of
``nnUNetTrainerAPEPretrain`` checkpoints (:mod:`nnunet_ape.nnunet.checkpoint_reader`) when it is imported, as the
``nnunet-ape`` commands do.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
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

# (checkpoint dict, its path) -> (APE model in eval mode on CPU, settings dict), or None when not the reader's format
CheckpointReader = Callable[[dict, Path], tuple[nn.Module, dict] | None]
_READERS: list[CheckpointReader] = []


def register_checkpoint_reader(reader: CheckpointReader) -> None:
    """Let :func:`load_ape_model` read another checkpoint format: ``reader(state, path)`` returns ``(model in eval
    mode on CPU, dict with the ``embed`` settings)`` for a checkpoint dict of its format, None for any other (it may
    raise InputError for a file of its format it cannot use). Registering the same reader twice keeps one."""
    if reader not in _READERS:
        _READERS.append(reader)


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


def is_nnunet_checkpoint(state) -> bool:
    """True for a dict shaped like an nnU-Net training checkpoint (``network_weights`` and ``init_args``); it names
    the format in the error when no reader takes such a file."""
    return isinstance(state, dict) and "network_weights" in state and "init_args" in state


def _from_readers(state, path: Path) -> tuple[nn.Module, dict]:
    """The model of a checkpoint that is not our ``.pt``, from the first registered reader that takes it."""
    for reader in _READERS:
        found = reader(state, path)
        if found is not None:
            return found
    if is_nnunet_checkpoint(state):
        raise InputError(f"{path}: an nnU-Net checkpoint, and no reader for it is registered "
                         "(import nnunet_ape.nnunet first, as the nnunet-ape commands do)")
    return _checked(state, path, APE_FORMAT)  # raises: not an APE checkpoint


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def load_ape_model(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Checkpoint file -> (APE model in eval mode on CPU, checkpoint dict). The file alone rebuilds the model.

    Takes the ``.pt`` of ``nnunet-ape pretrain ape`` (an :class:`APENet`) and any format a registered reader takes
    (:func:`register_checkpoint_reader`), e.g. the ``checkpoint_*.pth`` of nnU-Net's ``nnUNetTrainerAPEPretrain``
    once :mod:`nnunet_ape.nnunet` is imported; for those the dict returned holds the embedding settings only. The
    models take canonical volumes (``input_from_hu``). InputError for a file no reader takes.
    """
    path = Path(path)
    state = _read(path)
    if not (isinstance(state, dict) and state.get("format") == APE_FORMAT):
        return _from_readers(state, path)
    model = APENet(APEConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    return model.eval(), state


def load_ape_settings(path: str | os.PathLike) -> dict:
    """The checkpoint dict of an APE model (``embed`` settings, format, ...) without building the network where the
    file says it all (our ``.pt``); other formats are read through their registered reader."""
    path = Path(path)
    state = _read(path)
    if isinstance(state, dict) and state.get("format") == APE_FORMAT:
        return state
    return _from_readers(state, path)[1]


def file_hash(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file (to tie derived files to the checkpoint they came from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
