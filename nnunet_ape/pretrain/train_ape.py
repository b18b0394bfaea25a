"""APE pretraining: the paper's task (views, positions, distance and equivariance losses) on the shared loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnunet_ape.checkpoint import APE_FORMAT
from nnunet_ape.errors import InputError
from nnunet_ape.models.ape import PRESETS, APEConfig, APENet
from nnunet_ape.pretrain.batches import BatchConfig, PairBatches
from nnunet_ape.pretrain.choices import VARIANTS
from nnunet_ape.pretrain.loop import FINAL, LAST, LoopConfig, Task, autocast, run_training
from nnunet_ape.pretrain.loss import ape_loss_at_points
from nnunet_ape.pretrain.views import PAPER_PATCH_VOLUME, PAPER_SPACING_RANGE

__all__ = ["COARSE_SPACING_RANGE", "FINAL", "LAST", "PretrainConfig", "ape_task", "parse_spacing_range", "pretrain_ape"]

DEFAULT_EMBED_SPACING = (1.5, 1.5, 2.25)  # middle of the paper's training spacing range
DEFAULT_EMBED_PATCH = (128, 128, 96)
# Short CPU runs learn anatomy faster on coarse views: each view then spans more of the body. On 6 held-out
# phantoms (tiny model, 3 CPU minutes, 1 shot) mean box IoU rose from 0.16 at the paper's 1-2 mm to 0.22 at 3-4 mm
# and 0.26 at 4-5 mm (body-box baseline 0.27).
COARSE_SPACING_RANGE = ((4.0, 4.0, 6.0), (5.0, 5.0, 7.5))


def embed_settings_for_training(batch: BatchConfig) -> dict:
    """Embedding spacing and window for a model trained on ``batch``'s views: the middle of its spacing range (mm),
    and a window of as many voxels, relative to the views, as the default window (128x128x96) is to the paper's
    views (96x96x64 voxels); rounded up to a multiple of 16."""
    middle = tuple((lo + hi) / 2 for lo, hi in zip(*batch.spacing_range))
    scale = (batch.patch_volume / PAPER_PATCH_VOLUME) ** (1 / 3)
    patch = tuple(max(32, int(np.ceil(n * scale / 16)) * 16) for n in DEFAULT_EMBED_PATCH)
    return {"spacing": [round(m, 4) for m in middle], "patch_size": list(patch)}


def parse_spacing_range(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``paper``, ``coarse`` or ``LOW:HIGH`` (``x,y,z`` mm each) -> (low, high) spacings; InputError otherwise."""
    named = {"paper": PAPER_SPACING_RANGE, "coarse": COARSE_SPACING_RANGE}
    if text in named:
        return named[text]
    try:
        low, high = (tuple(float(v) for v in part.split(",")) for part in text.split(":"))
    except ValueError:
        low = high = ()
    if len(low) != 3 or len(high) != 3 or min(low) <= 0 or any(h < lo for lo, h in zip(low, high)):
        raise InputError(f"--spacing {text}: give paper, coarse or LOW:HIGH as x,y,z mm, e.g. 3,3,4.5:4,4,6")
    return low, high


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
        with autocast(device, cfg.amp):  # the network reads its map at the batch's points only
            points = model(batch["views"].to(device, non_blocking=True), batch["coords"].to(device))
        return ape_loss_at_points(points.float(), batch["positions"].to(device), cfg.batch.variant, cfg.equiv_weight)

    return Task(
        name="APE",
        format=APE_FORMAT,
        log_columns=["iteration", "loss", "dist", "equiv", "lr", "seconds"],
        build_model=build,
        model_config=lambda model: model.config.to_dict(),
        stream=lambda cached, seed, rank: PairBatches(cached, cfg.batch, seed=seed, rank=rank),
        loss=loss,
        extra_state={"embed": embed_settings_for_training(cfg.batch)},
    )


def pretrain_ape(images: list[Path], out_dir: Path, cfg: PretrainConfig, resume: bool = False) -> Path:
    """Pretrain an APE model on ``images`` (CT files or DICOM folders); returns the final checkpoint path.
    See :func:`nnunet_ape.pretrain.loop.run_training` for what is written."""
    if cfg.batch.variant not in VARIANTS:
        raise InputError(f"--variant {cfg.batch.variant}: unknown; choose one of {', '.join(VARIANTS)}")
    if cfg.model not in PRESETS:
        raise InputError(f"--model {cfg.model}: unknown; choose one of {', '.join(PRESETS)}")
    return run_training(ape_task(cfg), images, out_dir, cfg, resume)
