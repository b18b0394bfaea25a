"""The benchmarks' resumable nnU-Net training: a trainer mixin that checkpoints every epoch, stops cleanly before a
deadline, logs one JSON line per epoch (losses, pseudo Dice, the organ volume it predicts, a learning-curve point
on fixed validation cases) and skips nnU-Net's final validation; and the readers of that log (which epochs ran,
whether another one fits a budget, which ran on a quiet machine).

Used by ``bench_headneck_segmentation`` (localized vs full-image nnU-Net) and ``headneck_finetune`` (few-label
fine-tuning), which build their trainer classes from :class:`ResumableTraining` and pass the settings in the
environment variable ``BENCH_HN_SETTINGS``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from nnunet_ape.segmentation_scores import mean_per_organ, score_case


class OutOfTime(Exception):
    """Raised at an epoch end when the next epoch would overrun the invocation's budget."""


def organ_volume_ratio(volumes: list[float]) -> float | None:
    """Predicted (soft) over true organ voxels on an epoch's validation patches, rounded to 4 significant digits;
    None without organ voxels."""
    predicted, true = volumes
    return float(f"{predicted / true:.4g}") if true > 0 else None


class ResumableTraining:
    """Mixin for an nnU-Net trainer class (put it first in the bases). Settings come from the JSON in the
    environment variable BENCH_HN_SETTINGS (written by the benchmark that starts the training): epochs, iterations per epoch, validation batches,
    curve cases and interval, the deadline (unix seconds or null), the log file, the source labels and organs,
    torch threads, ``compile`` (torch.compile also on CPU, with channels-last weights there). Adds: a checkpoint every
    epoch, a clean stop at an epoch end before the deadline, one JSON line per epoch in the log (with the predicted /
    true organ volume on the validation patches, the check for a network that predicts no organ at all), the
    learning-curve prediction; skips nnU-Net's final full validation."""

    def __init__(self, plans: dict, configuration: str, fold: int | str, dataset_json: dict, device=None):
        import torch

        super().__init__(plans, configuration, fold, dataset_json, torch.device("cuda") if device is None else device)
        self.bench = json.loads(os.environ["BENCH_HN_SETTINGS"])
        self.num_epochs = self.bench["epochs"]
        self.num_iterations_per_epoch = self.bench["iterations_per_epoch"]
        self.num_val_iterations_per_epoch = self.bench["val_iterations"]
        self.save_every = 1
        if self.bench.get("threads"):
            torch.set_num_threads(self.bench["threads"])

    # nnU-Net's hooks --------------------------------------------------------------------------------------------
    def _do_i_compile(self) -> bool:
        """nnU-Net's choice, or always with the ``compile`` setting: nnU-Net 2.8 never compiles on CPU."""
        return bool(getattr(self, "bench", {}).get("compile")) or super()._do_i_compile()

    def initialize(self) -> None:
        super().initialize()
        if self.bench.get("compile") and self.device.type == "cpu":
            import torch

            from nnunet_ape.nnunet.pretrained_weights import unwrapped_network

            # channels-last weights take oneDNN's faster conv3d path; in place, so the optimizer keeps its parameters
            unwrapped_network(self.network).to(memory_format=torch.channels_last_3d)

    def on_train_start(self) -> None:
        super().on_train_start()
        self._train_seconds_before = sum(r["epoch_seconds"] for r in read_log(Path(self.bench["log"]))
                                         if r["epoch"] < self.current_epoch)
        self._epoch_seconds = []
        config = self.configuration_manager
        self._append({"kind": "start", "epoch": self.current_epoch, "time": time.time(), "patch_size": list(config.patch_size),
                      "batch_size": self.batch_size, "features": config.network_arch_init_kwargs["features_per_stage"],
                      "compiled": self._do_i_compile()})

    def on_epoch_start(self) -> None:
        self._epoch_began = time.perf_counter()
        super().on_epoch_start()

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._organ_volume = [0.0, 0.0]  # soft predicted, true organ voxels over the epoch's validation patches

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step; also adds up the organ volume the network predicts (softmax mass of the organ
        channels) against the true organ voxels. A network that predicts no organ anywhere, with certainty, scores
        about 0 here, while nnU-Net's soft-Dice term still rewards it on every patch without an organ."""
        import torch

        outputs = []
        hook = self.network.register_forward_hook(lambda module, inputs, output: outputs.append(output))
        try:
            result = super().validation_step(batch)
        finally:
            hook.remove()
        if outputs and not self.label_manager.has_regions:
            output = outputs[0][0] if isinstance(outputs[0], (list, tuple)) else outputs[0]
            target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
            organ = target > 0
            if self.label_manager.has_ignore_label:
                organ &= target != self.label_manager.ignore_label
            with torch.no_grad():
                self._organ_volume[0] += float(torch.softmax(output.float(), 1)[:, 1:].sum())
            self._organ_volume[1] += float(organ.sum())
        return result

    def on_epoch_end(self) -> None:
        seconds = time.perf_counter() - self._epoch_began
        epoch = self.current_epoch
        total = self._train_seconds_before + sum(self._epoch_seconds) + seconds
        record = {"kind": "epoch", "epoch": epoch, "iterations": (epoch + 1) * self.num_iterations_per_epoch,
                  "epoch_seconds": round(seconds, 3), "train_seconds": round(total, 3), "lr": self.optimizer.param_groups[0]["lr"],
                  "train_loss": float(self.logger.get_value("train_losses", step=-1)),
                  "val_loss": float(self.logger.get_value("val_losses", step=-1)),
                  "pseudo_dice": [float(d) for d in self.logger.get_value("dice_per_class_or_region", step=-1)],
                  "organ_volume_ratio": organ_volume_ratio(getattr(self, "_organ_volume", [0.0, 0.0])),
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3), "time": time.time(),
                  "load_1min": round(os.getloadavg()[0], 2)}
        if (epoch + 1) % self.bench["curve_every"] == 0 or epoch + 1 == self.num_epochs:
            record["curve"] = self._curve_point(epoch)
        self._append(record)
        self._epoch_seconds.append(seconds)
        super().on_epoch_end()  # checkpoint_latest (every epoch), checkpoint_best, epoch counter
        last = seconds + record.get("curve", {}).get("seconds", 0.0)
        deadline = self.bench.get("deadline")
        if deadline is not None and self.current_epoch < self.num_epochs and time.time() + last > deadline:
            raise OutOfTime

    def run_training(self) -> None:
        """nnU-Net's training loop; on the budget's end, the data loaders are shut down and the run returns."""
        try:
            super().run_training()
        except OutOfTime:
            self._append({"kind": "stop", "epoch": self.current_epoch, "time": time.time(), "reason": "--minutes budget"})
            self.print_to_log_file(f"bench: budget spent, stopping with {self.current_epoch} of {self.num_epochs} epochs "
                                   f"done (checkpoint_latest.pth); continue with --c", also_print_to_console=True)
            for loader in (self.dataloader_train, self.dataloader_val):
                if hasattr(loader, "_finish"):
                    loader._finish()

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """Skipped: the learning curve (fold-0 cases) and the test table replace nnU-Net's full validation."""
        self.print_to_log_file("bench: nnU-Net's final validation skipped (learning curve and test table instead)",
                               also_print_to_console=True)

    # benchmark ---------------------------------------------------------------------------------------------------
    def _append(self, record: dict) -> None:
        with open(self.bench["log"], "a") as f:
            f.write(json.dumps(record) + "\n")

    def _curve_point(self, epoch: int) -> dict:
        """Predict the curve cases with nnU-Net's validation path (no mirroring) and score them in the source
        geometry: ``{"dice": {organ: mean}, "cases": {organ: n}, "seconds": s}``."""
        began = time.perf_counter()
        folder = Path(self.bench["curve_dir"]) / f"epoch_{epoch:04d}"
        cases = self.bench["curve_cases"]
        saved = self.output_folder, self.inference_allowed_mirroring_axes
        self.do_split = lambda: ([], list(cases))  # the instance attribute shadows nnU-Net's split for this call
        self.output_folder, self.inference_allowed_mirroring_axes = str(folder), None
        try:
            super().perform_actual_validation(False)
        finally:
            del self.do_split
            self.output_folder, self.inference_allowed_mirroring_axes = saved
        organs, labels = self.bench["organs"], Path(self.bench["labels_dir"])
        scores = {c: score_case(folder / "validation" / f"{c}.nii.gz", labels / f"{c}.nii.gz", organs) for c in cases}
        shutil.rmtree(folder, ignore_errors=True)
        means = mean_per_organ(scores, list(organs), "dice")
        return {"dice": {o: round(m, 4) for o, (m, _) in means.items()}, "cases": {o: n for o, (_, n) in means.items()},
                "seconds": round(time.perf_counter() - began, 2)}


def read_log(log: Path, kind: str = "epoch") -> list[dict]:
    """The records of one ``kind`` of a training log ("epoch"; "start": one per invocation, at the epoch it began),
    the last one per epoch (an epoch redone after a crash replaces the first attempt), in epoch order."""
    if not log.exists():
        return []
    records = {}
    for line in log.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if r.get("kind") == kind:
                records[r["epoch"]] = r
    return [records[e] for e in sorted(records)]


def longest_epoch_seconds(logs: list[Path]) -> float:
    """The longest epoch in the training ``logs`` (:func:`read_log`), its learning-curve point included (seconds;
    0 with none logged)."""
    return max((r["epoch_seconds"] + r.get("curve", {}).get("seconds", 0.0) for log in logs for r in read_log(log)),
               default=0.0)


def epoch_fits(logs: list[Path], deadline: float | None) -> bool:
    """Whether one more training epoch, as long as the longest in ``logs``, ends before ``deadline`` (unix seconds;
    None: no budget). A trainer stops at its first epoch end past the deadline, so a model started with less time
    left would overrun it by a whole epoch."""
    return deadline is None or time.time() + longest_epoch_seconds(logs) < deadline


def with_quiet_seconds(records: list[dict]) -> list[dict]:
    """The epoch records of one model (:func:`read_log`) with ``quiet_train_seconds`` added: the training time up
    to and including each epoch as it would have been on a quiet machine. An epoch that shared the CPU
    (:func:`is_quiet` false) counts as the model's mean quiet epoch, so other work beside the benchmark cannot
    lengthen a model's training time or stretch its learning curve; a model without any quiet epoch keeps its
    measured seconds. (Learning-curve predictions run between epochs and are in neither.)"""
    quiet = [r["epoch_seconds"] for r in records if is_quiet(r)]
    total, out = 0.0, []
    for r in records:
        total += r["epoch_seconds"] if is_quiet(r) or not quiet else float(np.mean(quiet))
        out.append({**r, "quiet_train_seconds": round(total, 3)})
    return out


def is_quiet(record: dict) -> bool:
    """Whether an epoch ran without other CPU work beside it: not marked ``shared`` and a 1-minute load average
    (recorded at its end) of at most twice the cores + 0.5 (training alone, its process with its torch threads and
    its loader worker, measured 2.9-4.1 on 2 cores)."""
    return not record.get("shared") and record.get("load_1min", 0.0) <= 2 * (os.cpu_count() or 1) + 0.5
