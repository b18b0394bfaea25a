"""The reader that lets :func:`nnunet_ape.checkpoint.load_ape_model` take the checkpoints of nnU-Net's
``nnUNetTrainerAPEPretrain`` (registered when :mod:`nnunet_ape.nnunet` is imported).

This module stays light: it imports nnU-Net (through :mod:`nnunet_ape.nnunet.ape_checkpoint`) only when it is
given an nnU-Net checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from nnunet_ape.checkpoint import is_nnunet_checkpoint, register_checkpoint_reader


def read_nnunet_checkpoint(state: dict, path: Path) -> tuple[nn.Module, dict] | None:
    """An nnU-Net checkpoint dict -> (:class:`~nnunet_ape.nnunet.ape_checkpoint.NNUNetAPE` in eval mode on CPU,
    dict with the ``embed`` settings in canonical axes); None for any other dict. InputError for an nnU-Net
    checkpoint that is not an APE model (a segmentation run) or that embed cannot use."""
    if not is_nnunet_checkpoint(state):
        return None
    from nnunet_ape.nnunet.ape_checkpoint import ape_model_from_nnunet

    return ape_model_from_nnunet(state, str(path))


def register_nnunet_checkpoint_reader() -> None:
    """Let :func:`nnunet_ape.checkpoint.load_ape_model` read ``nnUNetTrainerAPEPretrain`` checkpoints (idempotent)."""
    register_checkpoint_reader(read_nnunet_checkpoint)
