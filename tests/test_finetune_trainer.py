"""nnUNetTrainerFinetune: nnU-Net main's fine-tuning recipe (encoder transfer, learning rate 1e-3 with a linear
warm-up, then poly) for nnU-Net 2.8.1. The schedule, the rate each training step gets, and the refusal to start
without -pretrained_weights. Its use in a real nnUNetv2_train run: the few-label benchmark's ape_warmup variant
(tests/test_bench_pretrain_finetune.py, slow)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ape.nnunet import finetune_trainer as ft
from nnunet_ape.nnunet import pretrained_weights
from nnunet_ape.nnunet.finetune_trainer import nnUNetTrainerFinetune


def test_the_schedule_rises_every_iteration_to_nnunets_fine_tuning_rate_then_decays():
    epochs, per_epoch = 40, 100
    rates = [ft.warmup_poly_lr(e, s, epochs, per_epoch) for e in range(epochs) for s in range(per_epoch)]
    warm = ft.warmup_epochs(epochs) * per_epoch
    assert warm == 200  # 5% of the epochs, as nnU-Net main's 50 of 1000
    assert rates[0] == pytest.approx(ft.PEAK_LR / warm)
    assert all(a < b for a, b in zip(rates[:warm - 1], rates[1:warm]))
    assert rates[warm - 1] == pytest.approx(ft.PEAK_LR) and rates[warm] == pytest.approx(ft.PEAK_LR)
    assert all(a >= b for a, b in zip(rates[warm:-1], rates[warm + 1:]))  # then never rises
    assert rates[-1] < 0.1 * ft.PEAK_LR and max(rates) == pytest.approx(ft.PEAK_LR)
    assert ft.warmup_epochs(1000) == 50 and ft.warmup_epochs(5) == 1  # a short schedule still warms up
    assert ft.warmup_poly_lr(0, 0, 5, 60) == pytest.approx(ft.PEAK_LR / 60)


def _trainer(epoch: int, epochs: int = 10, per_epoch: int = 4) -> nnUNetTrainerFinetune:
    """The trainer's state that its learning-rate hooks use, without a dataset."""
    trainer = object.__new__(nnUNetTrainerFinetune)
    trainer.network = torch.nn.Conv3d(1, 2, 1)
    trainer.optimizer = torch.optim.SGD(trainer.network.parameters(), lr=ft.PEAK_LR, momentum=0.99, nesterov=True)
    trainer.lr_scheduler = PolyLRScheduler(trainer.optimizer, ft.PEAK_LR, epochs)
    trainer.logger = SimpleNamespace(log=lambda *args: None)
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.current_epoch = epochs, per_epoch, epoch
    trainer.logged = []
    trainer.print_to_log_file = lambda *args, **kwargs: trainer.logged.append(" ".join(map(str, args)))
    return trainer


def test_each_training_step_runs_at_the_schedules_rate(monkeypatch):
    seen = []
    monkeypatch.setattr(nnUNetTrainer, "train_step", lambda self, batch: seen.append(self.optimizer.param_groups[0]["lr"]) or {})
    for epoch in (0, 1, 5):  # epoch 0 is the warm-up (1 of 10 epochs), then poly
        trainer = _trainer(epoch)
        trainer.on_train_epoch_start()
        for _ in range(4):
            trainer.train_step({})
        assert any("learning rate" in line for line in trainer.logged)
    assert seen == pytest.approx([ft.warmup_poly_lr(e, s, 10, 4) for e in (0, 1, 5) for s in range(4)])
    assert seen[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3]) and seen[4] == pytest.approx(1e-3)


def test_it_refuses_to_start_without_pretrained_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(nnUNetTrainer, "on_train_start", lambda self: None)
    trainer = _trainer(0)
    with pytest.raises(SystemExit, match="add -pretrained_weights"):
        trainer.on_train_start()
    checkpoint = tmp_path / "pretrained.pth"
    torch.save({"network_weights": {k: v + 1 for k, v in trainer.network.state_dict().items()}}, checkpoint)
    pretrained_weights.load_pretrained_weights_adding_channels(trainer.network, str(checkpoint))
    assert pretrained_weights.loaded_from(trainer.network) == str(checkpoint)
    trainer.on_train_start()  # weights loaded: starts
    _trainer(3).on_train_start()  # a resumed run (--c) has no -pretrained_weights: starts
