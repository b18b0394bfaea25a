"""``nnUNetTrainerDemo``: stock nnU-Net training cut to a wall-time budget, so that two models can be compared at the
same training time (``nnunet-ape demo`` trains a crop model and a full-image model this way).

The budget is the environment variable ``NNUNET_APE_TRAIN_SECONDS`` (training seconds, validation batches included;
start-up and data-loader warm-up not). Epochs are short (:data:`ITERATIONS_PER_EPOCH`), the run stops at the first
epoch end at which the next epoch would overrun the budget and saves ``checkpoint_final.pth`` as a finished run does,
so ``nnUNetv2_predict`` and ``nnunet-ape predict`` load it as any nnU-Net model. The learning rate follows nnU-Net's
poly schedule over :data:`MAX_EPOCHS`, which a budget of minutes never reaches (the rate stays near its start). No
mirroring at inference (one pass per window), and nnU-Net's final full-image validation is skipped (the demo scores
held-out cases itself).
"""

from __future__ import annotations

import json
import os
import time

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

BUDGET_VARIABLE = "NNUNET_APE_TRAIN_SECONDS"
RECORD = "training.json"  # written into the fold folder at the end: epochs, iterations, training seconds
ITERATIONS_PER_EPOCH = 25
VALIDATION_ITERATIONS = 2
MAX_EPOCHS = 1000


class _BudgetSpent(Exception):
    """Raised at an epoch end when the next epoch would overrun the budget."""


def training_budget() -> float:
    """Seconds of training from :data:`BUDGET_VARIABLE`; a clear error when it is missing or not a positive number."""
    raw = os.environ.get(BUDGET_VARIABLE)
    try:
        seconds = float(raw) if raw is not None else None
    except ValueError:
        seconds = None
    if seconds is None or seconds <= 0:
        raise RuntimeError(f"nnUNetTrainerDemo trains for a time budget: set {BUDGET_VARIABLE} to the training seconds "
                           f"(got {raw!r})")
    return seconds


class nnUNetTrainerDemo(nnUNetTrainer):
    """nnU-Net's trainer with a wall-time budget (:func:`training_budget`), short epochs, no test-time mirroring and
    no final validation."""

    def __init__(self, plans: dict, configuration: str, fold: int | str, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.budget_seconds = training_budget()
        self.num_epochs = MAX_EPOCHS
        self.num_iterations_per_epoch = ITERATIONS_PER_EPOCH
        self.num_val_iterations_per_epoch = VALIDATION_ITERATIONS
        self.trained_seconds = 0.0

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        return rotation, dummy_2d, initial_patch_size, None  # inference: one pass per window

    def on_epoch_start(self) -> None:
        self._epoch_began = time.perf_counter()
        super().on_epoch_start()

    def on_epoch_end(self) -> None:
        seconds = time.perf_counter() - self._epoch_began
        self.trained_seconds += seconds
        super().on_epoch_end()
        if self.trained_seconds + seconds > self.budget_seconds:
            raise _BudgetSpent

    def run_training(self) -> None:
        """nnU-Net's training loop until the budget is spent; then nnU-Net's own end of training (final checkpoint,
        data loaders shut down)."""
        try:
            super().run_training()
        except _BudgetSpent:
            self.print_to_log_file(f"training budget of {self.budget_seconds:.0f} s spent after {self.current_epoch} "
                                   f"epochs ({self.current_epoch * self.num_iterations_per_epoch} iterations, "
                                   f"{self.trained_seconds:.0f} s)", also_print_to_console=True)
            self.on_train_end()

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.local_rank == 0:
            record = {"epochs": self.current_epoch, "iterations": self.current_epoch * self.num_iterations_per_epoch,
                      "train_seconds": round(self.trained_seconds, 1), "budget_seconds": self.budget_seconds,
                      "patch_size": [int(p) for p in self.configuration_manager.patch_size], "batch_size": self.batch_size}
            with open(os.path.join(self.output_folder, RECORD), "w") as f:
                json.dump(record, f, indent=1)

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """Skipped: the demo predicts and scores held-out cases itself."""
        self.print_to_log_file("nnUNetTrainerDemo: nnU-Net's final validation skipped", also_print_to_console=True)


__all__ = ["nnUNetTrainerDemo"]
