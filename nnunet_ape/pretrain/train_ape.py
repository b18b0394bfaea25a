"""APE pretraining: the paper's task (views, positions, distance and equivariance losses) on the shared loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nnunet_ape.checkpoint import APE_FORMAT
from nnunet_ape.errors import InputError
from nnunet_ape.models.ape import PRESETS, APEConfig, APENet
from nnunet_ape.pretrain.batches import VARIANTS, BatchConfig, PairBatches
from nnunet_ape.pretrain.loop import FINAL, LAST, LoopConfig, Task, autocast, run_training
from nnunet_ape.pretrain.loss import ape_loss

__all__ = ["FINAL", "LAST", "PretrainConfig", "ape_task", "pretrain_ape"]

DEFAULT_EMBED_SPACING = (1.5, 1.5, 2.25)  # middle of the training spacing range
DEFAULT_EMBED_PATCH = (128, 128, 96)


@dataclass
class PretrainConfig(LoopConfig):
    """Everything an APE pretraining run needs besides its images."""

    equiv_weight: float = 1.0
    model: str = "base"
    batch: BatchConfig = field(default_factory=BatchConfig)


def ape_task(cfg: PretrainConfig) -> Task:
    """The APE task of ``cfg``: network preset, view-pair batches and the paper's loss."""

    def build(config: dict | None) -> nn.Module:
        return APENet(APEConfig.from_dict(config) if config else PRESETS[cfg.model])

    def loss(model: nn.Module, batch: dict, device: torch.device):
        with autocast(device, cfg.amp):
            embeddings = model(batch["views"].to(device, non_blocking=True))
        return ape_loss(
            embeddings.float(), batch["coords"].to(device), batch["positions"].to(device), cfg.batch.variant, cfg.equiv_weight
        )

    return Task(
        name="APE",
        format=APE_FORMAT,
        log_columns=["iteration", "loss", "dist", "equiv", "lr", "seconds"],
        build_model=build,
        model_config=lambda model: model.config.to_dict(),
        stream=lambda cached, seed, rank: PairBatches(cached, cfg.batch, seed=seed, rank=rank),
        loss=loss,
        extra_state={"embed": {"spacing": list(DEFAULT_EMBED_SPACING), "patch_size": list(DEFAULT_EMBED_PATCH)}},
    )


def pretrain_ape(images: list[Path], out_dir: Path, cfg: PretrainConfig, resume: bool = False) -> Path:
    """Pretrain an APE model on ``images`` (CT files or DICOM folders); returns the final checkpoint path.
    See :func:`nnunet_ape.pretrain.loop.run_training` for what is written."""
    if cfg.batch.variant not in VARIANTS:
        raise InputError(f"--variant {cfg.batch.variant}: unknown; choose one of {', '.join(VARIANTS)}")
    if cfg.model not in PRESETS:
        raise InputError(f"--model {cfg.model}: unknown; choose one of {', '.join(PRESETS)}")
    return run_training(ape_task(cfg), images, out_dir, cfg, resume)
