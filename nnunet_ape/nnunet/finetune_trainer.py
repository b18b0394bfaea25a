"""``nnUNetTrainerFinetune``: fine-tuning from ``-pretrained_weights`` with the recipe of nnU-Net's own fine-tuning
trainer (``PretrainedTrainer`` on nnU-Net's GitHub main, the path nnssl checkpoints take; not in the 2.8.1 release):

- the encoder and stem come from the checkpoint, the decoder and heads start fresh (the loader of
  ``nnUNetTrainerEncoderInit``: :func:`nnunet_ape.nnunet.pretrained_weights.load_pretrained_encoder`);
- learning rate 1e-3 instead of nnU-Net's 1e-2, raised linearly over the first 5% of the epochs (nnU-Net main: 50
  of 1000), then nnU-Net's poly decay from there (:func:`warmup_poly_lr`). The warm-up rises every iteration, not
  every epoch as on nnU-Net main, so that short schedules warm up too.

Deep supervision stays on (``PretrainedTrainer`` turns it off, for its transformer networks). Why: with stock
``nnUNetTrainer`` (every weight but the heads, learning rate 1e-2 from the first step), an APE-pretrained network
fine-tuned on 5 labeled head-and-neck CTs collapsed within 75 iterations to predicting no organ anywhere, with
certainty (docs/pretraining.md); with this recipe it did not.
"""

from __future__ import annotations

import torch

from nnunet_ape.nnunet import pretrained_weights
from nnunet_ape.nnunet.trainers import nnUNetTrainerEncoderInit

PEAK_LR = 1e-3  # nnU-Net main's PretrainedTrainer.initial_lr for CNNs
WARMUP_SHARE = 0.05  # of the epochs: nnU-Net main's warmup_duration_whole_net, 50 of 1000


def warmup_epochs(epochs: int, share: float = WARMUP_SHARE) -> int:
    """Epochs of linear warm-up in a schedule of ``epochs``: ``share`` of them, at least 1."""
    return max(1, round(share * epochs))


def warmup_poly_lr(epoch: int, step: int, epochs: int, iterations_per_epoch: int, peak: float = PEAK_LR,
                   share: float = WARMUP_SHARE, exponent: float = 0.9) -> float:
    """Learning rate at iteration ``step`` (0-based) of ``epoch`` (0-based): linear from peak / (W x
    iterations_per_epoch) up to ``peak`` over the first W = :func:`warmup_epochs` epochs, then nnU-Net's poly decay
    from W to ``epochs`` (one value per epoch, as nnU-Net main's ``PolyLRScheduler_offset``)."""
    warm = warmup_epochs(epochs, share)
    if epoch < warm:
        return peak * (epoch * iterations_per_epoch + step + 1) / (warm * iterations_per_epoch)
    return peak * max(0.0, 1 - (epoch - warm) / max(1, epochs - warm)) ** exponent


class nnUNetTrainerFinetune(nnUNetTrainerEncoderInit):
    """Stock nnU-Net segmentation training for ``-pretrained_weights`` with nnU-Net main's fine-tuning recipe (module
    doc): encoder and stem transferred, learning rate :func:`warmup_poly_lr`. Resumes with ``--c``; refuses to start
    without ``-pretrained_weights``. Stock ``nnUNetv2_predict -tr nnUNetTrainerFinetune`` predicts with it."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = PEAK_LR  # before initialize() builds the optimizer
        self._step_in_epoch = 0

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.current_epoch == 0 and not pretrained_weights.loaded_from(self.network):
            raise SystemExit(f"nnunet-ape: {type(self).__name__} fine-tunes pretrained weights; add -pretrained_weights "
                             "CHECKPOINT, or train from scratch with nnU-Net's default trainer (no -tr)")

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()  # nnU-Net's poly step; the rate is set again below
        self._step_in_epoch = 0
        self._set_lr()
        self.print_to_log_file(f"nnunet-ape: learning rate {self.optimizer.param_groups[0]['lr']:.6f} at this epoch's first "
                               f"iteration (linear warm-up over {warmup_epochs(self.num_epochs)} epochs to {PEAK_LR:g}, "
                               "then poly)")

    def train_step(self, batch: dict) -> dict:
        self._set_lr()
        self._step_in_epoch += 1
        return super().train_step(batch)

    def _set_lr(self) -> None:
        lr = warmup_poly_lr(self.current_epoch, self._step_in_epoch, self.num_epochs, self.num_iterations_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr


__all__ = ["nnUNetTrainerFinetune"]
