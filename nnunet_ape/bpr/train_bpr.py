"""BPR pretraining (Yan et al. 2018, bpreg conventions) on the shared loop: m equidistant axial slices per CT,
order + distance losses and the reference heuristic order loss, weighted by flags."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import IterableDataset, get_worker_info

from nnunet_ape.bpr.augment import AUGMENT_PRESETS, augment_slices
from nnunet_ape.bpr.losses import distance_loss, heuristic_order_loss, order_loss
from nnunet_ape.bpr.slices import axial_slices, sample_equidistant
from nnunet_ape.errors import InputError
from nnunet_ape.io import Volume
from nnunet_ape.models.bpr import TRUNKS, BPRNet
from nnunet_ape.pretrain.cache import CachedCT
from nnunet_ape.pretrain.loop import LoopConfig, Task, autocast, run_training

BPR_FORMAT = "nnunet-ape/bpr-v1"


@dataclass
class BPRConfig(LoopConfig):
    """A BPR pretraining run: trunk, ``slices`` (m) per CT, ``cts`` per batch, and the loss weights."""

    trunk: str = "efficientnet"
    slices: int = 8
    cts: int = 4
    order_weight: float = 1.0
    distance_weight: float = 1.0
    heuristic_weight: float = 0.0
    heuristic_alpha: float = 1.0
    heuristic_beta: float = 0.02
    lr: float = 1e-4
    augment: str = "light"  # a key of nnunet_ape.bpr.augment.AUGMENT_PRESETS


class SliceBatches(IterableDataset):
    """Endless batches: ``slices`` ``(cts * m, 1, 128, 128)`` and ``z_mm`` ``(cts, m)``, feet to head per CT."""

    def __init__(self, cts: list[CachedCT], cfg: BPRConfig, seed: int = 0, rank: int = 0) -> None:
        super().__init__()
        self.cts = [c for c in cts if np.load(c.path, mmap_mode="r").shape[2] >= cfg.slices]
        if not self.cts:
            raise InputError(f"no CT has the {cfg.slices} slices a BPR sample needs; lower --slices")
        self.cfg, self.seed, self.rank = cfg, seed, rank

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        rng = np.random.default_rng([self.seed, self.rank, info.id if info is not None else 0])
        augment = AUGMENT_PRESETS[self.cfg.augment]
        while True:
            slices, z = [], []
            for ct in (self.cts[i] for i in rng.integers(len(self.cts), size=self.cfg.cts)):
                array = np.load(ct.path, mmap_mode="r")
                index = sample_equidistant(rng, array.shape[2], self.cfg.slices)
                # the cache is canonical already (LPS, identity direction), so axial_slices keeps index order
                ct_slices = axial_slices(Volume(array, ct.spacing), index)
                slices.append(augment_slices(ct_slices, rng, augment) if augment is not None else ct_slices)
                z.append(index * ct.spacing[2])
            yield {"slices": torch.cat(slices), "z_mm": torch.as_tensor(np.stack(z), dtype=torch.float32)}


def bpr_loss(scores: torch.Tensor, z_mm: torch.Tensor, cfg: BPRConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the three losses for scores ``(cts, m)``; returns it and its parts for the log."""
    parts = {
        "order": order_loss(scores),
        "distance": distance_loss(scores),
        "heuristic": heuristic_order_loss(scores, z_mm, cfg.heuristic_alpha, cfg.heuristic_beta),
    }
    total = cfg.order_weight * parts["order"] + cfg.distance_weight * parts["distance"] + cfg.heuristic_weight * parts["heuristic"]
    return total, {"loss": total.item(), **{k: v.item() for k, v in parts.items()}}


def bpr_task(cfg: BPRConfig) -> Task:
    """The BPR task of ``cfg`` for :func:`nnunet_ape.pretrain.loop.run_training`."""

    def loss(model: nn.Module, batch: dict, device: torch.device):
        z = batch["z_mm"].to(device)
        with autocast(device, cfg.amp):
            scores = model(batch["slices"].to(device, non_blocking=True))
        scores = scores.float().view(z.shape)
        return bpr_loss(scores, z, cfg)

    return Task(
        name="BPR",
        format=BPR_FORMAT,
        log_columns=["iteration", "loss", "order", "distance", "heuristic", "lr", "seconds"],
        build_model=lambda config: BPRNet((config or {}).get("trunk", cfg.trunk)),
        model_config=lambda model: {"trunk": model.trunk_name},
        stream=lambda cached, seed, rank: SliceBatches(cached, cfg, seed, rank),
        loss=loss,
    )


def pretrain_bpr(images: list[Path], out_dir: Path, cfg: BPRConfig, resume: bool = False) -> Path:
    """Pretrain a BPR slice scorer on ``images``; returns the final checkpoint path (files as for APE)."""
    if cfg.trunk not in TRUNKS:
        raise InputError(f"--trunk {cfg.trunk}: unknown; choose one of {', '.join(TRUNKS)}")
    if cfg.augment not in AUGMENT_PRESETS:
        raise InputError(f"--augment {cfg.augment}: unknown; choose one of {', '.join(AUGMENT_PRESETS)}")
    if cfg.slices < 3:
        raise InputError(f"--slices {cfg.slices}: the distance loss needs at least 3 slices per CT")
    return run_training(bpr_task(cfg), images, out_dir, cfg, resume)
