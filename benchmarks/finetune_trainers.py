"""The few-label benchmark's nnU-Net trainers (:mod:`headneck_finetune`): the APE pretraining with an iteration
budget and a deadline, and one fine-tuning trainer per variant (scratch, the APE starts, nnU-Net's fine-tuning recipe,
the APE channels), each seeded and with the segmentation benchmark's resumable epochs and learning curve
(:class:`resumable_training.ResumableTraining`). nnU-Net finds them through the generated :data:`TRAINER_SHIM` in
``WORK/ext`` (``nnUNet_extTrainer``); the variants are described in :mod:`headneck_finetune`'s docstring.
"""

from __future__ import annotations

import json
import os
import random
import time

import numpy as np

import resumable_training as rt
from finetune_starts import match_output_spread, nnunet_initialised_copy, reinit_decoder_end, rescale_to_init_norms

VARIANTS = {"scratch": "nnUNetTrainerFinetuneScratch", "ape": "nnUNetTrainerFinetuneAPE",
            "ape_reinit": "nnUNetTrainerFinetuneAPEReinit", "ape_rescaled": "nnUNetTrainerFinetuneAPERescaled",
            "ape_matched": "nnUNetTrainerFinetuneAPEMatched",
            "ape_warmup": "nnUNetTrainerFinetuneAPEWarmup", "channels": "nnUNetTrainerFinetuneChannels"}
PRETRAIN_TRAINER = "nnUNetTrainerFinetunePretrain"
PRETRAIN_EPOCH = 25  # iterations per pretraining epoch (a checkpoint after each)


class _random_states_kept:
    """Context: Python's and numpy's global random states restored on exit (torch's: ``torch.random.fork_rng``)."""

    def __enter__(self) -> None:
        self._states = random.getstate(), np.random.get_state()

    def __exit__(self, *exc) -> None:
        random.setstate(self._states[0])
        np.random.set_state(self._states[1])


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def trainer_classes() -> dict[str, type]:
    """The benchmark's trainers by name (registered in this module so that nnU-Net's workers can pickle them): the
    pretraining trainer with its iteration budget and deadline, and the fine-tuning variants."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_ape.nnunet.finetune_trainer import nnUNetTrainerFinetune
    from nnunet_ape.nnunet.pretrain_trainer import nnUNetTrainerAPEPretrain
    from nnunet_ape.nnunet.trainers import nnUNetTrainerAPEChannels

    class _Pretrain(nnUNetTrainerAPEPretrain):
        """APE pretraining for BENCH_FT_SETTINGS' iterations, a checkpoint every epoch, a clean stop before its
        deadline (continue with --c)."""

        def __init__(self, plans, configuration, fold, dataset_json, device=None):
            import torch

            super().__init__(plans, configuration, fold, dataset_json, torch.device("cuda") if device is None else device)
            self.bench = json.loads(os.environ["BENCH_FT_SETTINGS"])
            _seed_everything(self.bench["seed"])
            self.num_iterations_per_epoch = PRETRAIN_EPOCH
            self.num_epochs = max(1, self.bench["pretrain_iterations"] // PRETRAIN_EPOCH)
            self.num_val_iterations_per_epoch = 5
            self.save_every = 1

        def on_epoch_start(self) -> None:
            self._epoch_began = time.perf_counter()
            super().on_epoch_start()

        def on_epoch_end(self) -> None:
            super().on_epoch_end()
            deadline, last = self.bench.get("deadline"), time.perf_counter() - self._epoch_began
            if deadline is not None and self.current_epoch < self.num_epochs and time.time() + last > deadline:
                raise rt.OutOfTime

        def run_training(self) -> None:
            try:
                super().run_training()
            except rt.OutOfTime:
                self.print_to_log_file(f"bench: budget spent after {self.current_epoch} of {self.num_epochs} epochs; "
                                       "continue with --c", also_print_to_console=True)
                for loader in (self.dataloader_train, self.dataloader_val):
                    if hasattr(loader, "_finish"):
                        loader._finish()

    class _FineTune(rt.ResumableTraining, nnUNetTrainer):
        """Stock nnUNetTrainer with the segmentation benchmark's resumable epochs and learning curve, seeded."""

        reinit = False
        rescale = ""  # "" (none), "norm" (rescale_to_init_norms) or "spread" (match_output_spread)

        def __init__(self, plans, configuration, fold, dataset_json, device=None):
            super().__init__(plans, configuration, fold, dataset_json, device)
            _seed_everything(self.bench["seed"])

        def on_train_start(self) -> None:
            super().on_train_start()
            from nnunet_ape.nnunet.pretrained_weights import unwrapped_network

            if self.reinit and self.current_epoch == 0:  # after -pretrained_weights, before the first step
                n = reinit_decoder_end(unwrapped_network(self.network), nnunet_init=bool(self.rescale))
                self.print_to_log_file(f"bench: re-initialised {n} modules of the last decoder stage and the heads"
                                       + (" (nnU-Net's initialisation)" if self.rescale else ""), also_print_to_console=True)
            if self.rescale and self.current_epoch == 0:
                network = unwrapped_network(self.network)
                if self.rescale == "norm":
                    factors, what = rescale_to_init_norms(network), "initial weight norm"
                else:
                    factors, what = self._match_spread(network), "initial output spread on a training batch"
                self.print_to_log_file(f"bench: scaled {len(factors)} convolutions followed by a norm to nnU-Net's "
                                       f"{what} (factors {min(factors):.3g}-{max(factors):.3g})", also_print_to_console=True)

        def _match_spread(self, network) -> list[float]:
            """:func:`match_output_spread` against :func:`nnunet_initialised_copy` of the network, on one training
            batch made in this process; the global random states are restored afterwards, so the run's own random
            draws are not shifted (nnU-Net's loader workers draw from unseeded streams anyway)."""
            import torch

            loader = self.dataloader_train  # nnU-Net's (NonDet)MultiThreadedAugmenter, or its SingleThreadedAugmenter
            generator = getattr(loader, "generator", None) or getattr(loader, "data_loader", loader)
            with torch.random.fork_rng(), _random_states_kept():
                batch = generator.generate_train_batch()["data"]
            reference = nnunet_initialised_copy(network)
            batch = torch.as_tensor(batch).to(self.device)
            if self.device.type == "cpu" and self.bench.get("compile"):
                batch = batch.contiguous(memory_format=torch.channels_last_3d)
            return match_output_spread(network, reference, batch)

    class _FineTuneWarmup(rt.ResumableTraining, nnUNetTrainerFinetune):
        """The plugin's nnUNetTrainerFinetune (nnU-Net main's fine-tuning recipe) with the same mixin, seeded."""

        def __init__(self, plans, configuration, fold, dataset_json, device=None):
            super().__init__(plans, configuration, fold, dataset_json, device)
            _seed_everything(self.bench["seed"])

    class _FineTuneChannels(rt.ResumableTraining, nnUNetTrainerAPEChannels):
        """nnUNetTrainerAPEChannels (CT + APE channels, random initialisation) with the same mixin, seeded."""

        def __init__(self, plans, configuration, fold, dataset_json, device=None):
            super().__init__(plans, configuration, fold, dataset_json, device)
            _seed_everything(self.bench["seed"])

    named = {PRETRAIN_TRAINER: (_Pretrain, {}), VARIANTS["scratch"]: (_FineTune, {}), VARIANTS["ape"]: (_FineTune, {}),
             VARIANTS["ape_reinit"]: (_FineTune, {"reinit": True}), VARIANTS["ape_warmup"]: (_FineTuneWarmup, {}),
             VARIANTS["ape_rescaled"]: (_FineTune, {"reinit": True, "rescale": "norm"}),
             VARIANTS["ape_matched"]: (_FineTune, {"reinit": True, "rescale": "spread"}),
             VARIANTS["channels"]: (_FineTuneChannels, {})}
    classes = {name: type(name, (base,), {"__module__": __name__, "__qualname__": name, **attrs})
               for name, (base, attrs) in named.items()}
    globals().update(classes)
    return classes


TRAINER_SHIM = '''"""Generated by benchmarks/headneck_finetune.py: the trainers of benchmarks/finetune_trainers.py, for nnU-Net's nnUNet_extTrainer lookup."""
import sys
sys.path.insert(0, {benchmarks!r})
from finetune_trainers import trainer_classes
globals().update(trainer_classes())
'''
