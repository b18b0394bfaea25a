"""The few-label benchmark's check for a network that predicts no organ at all: the organ volume its validation
patches get, logged per epoch and shown in the report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import finetune_report  # noqa: E402
import resumable_training as rt  # noqa: E402


class _Trainer:
    """What ResumableTraining's validation step calls on nnU-Net's trainer: the network and the label manager."""

    def __init__(self, logits: torch.Tensor):
        self.network = torch.nn.Conv3d(1, logits.shape[1], 1)
        self.logits = logits
        self.label_manager = SimpleNamespace(has_regions=False, has_ignore_label=False)

    def on_validation_epoch_start(self) -> None:
        pass

    def validation_step(self, batch: dict) -> dict:
        output = self.network(batch["data"])
        return {"shape": tuple(output.shape)}


class _Checked(rt.ResumableTraining, _Trainer):
    def __init__(self, logits: torch.Tensor):  # no nnU-Net, no settings: only the validation hooks are used
        _Trainer.__init__(self, logits)
        with torch.no_grad():  # the network returns the given logits whatever the input
            self.network.weight.zero_()
            self.network.bias.zero_()
        self.network.register_forward_hook(lambda module, inputs, output: self.logits)


def _volume_ratio(logits: torch.Tensor, target: torch.Tensor, deep_supervision: bool) -> float | None:
    trainer = _Checked(logits)
    trainer.on_validation_epoch_start()
    data = torch.zeros((1, 1) + tuple(target.shape[2:]))
    batch = {"data": data, "target": [target, target[:, :, ::2, ::2, ::2]] if deep_supervision else target}
    assert trainer.validation_step(batch) == {"shape": tuple(logits.shape)}  # nnU-Net's result passes through
    return rt.organ_volume_ratio(trainer._organ_volume)


def test_the_predicted_organ_volume_separates_a_collapsed_network_from_an_unsure_one():
    target = torch.zeros((1, 1, 8, 8, 8))
    target[0, 0, 2:4, 2:4, 2:4] = 1  # 8 voxels of organ 1
    target[0, 0, 5:7, 5:7, 5:7] = 2  # 8 of organ 2
    unsure = torch.zeros((1, 3, 8, 8, 8))  # every class equally likely: 2/3 of each voxel is organ
    assert _volume_ratio(unsure, target, deep_supervision=False) == pytest.approx(512 * 2 / 3 / 16, rel=1e-3)
    collapsed = torch.zeros((1, 3, 8, 8, 8))
    collapsed[:, 0] = 30.0  # background with certainty everywhere, as the APE start at 1500 iterations
    assert _volume_ratio(collapsed, target, deep_supervision=False) < 1e-9
    right = torch.zeros((1, 3, 8, 8, 8))
    right[:, 0] = 30.0 * (target[:, 0] == 0)
    right[:, 1] = 30.0 * (target[:, 0] == 1)
    right[:, 2] = 30.0 * (target[:, 0] == 2)
    assert _volume_ratio(right, target, deep_supervision=True) == pytest.approx(1.0, rel=1e-6)
    assert _volume_ratio(right, torch.zeros_like(target), deep_supervision=False) is None  # no organ on the patches


def test_the_report_shows_each_runs_last_epoch_with_its_organ_volume(tmp_path):
    def log(run: str, records: list[dict]) -> None:
        folder = tmp_path / "finetune" / run
        folder.mkdir(parents=True)
        (folder / "training_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "settings.json").write_text(json.dumps({"iterations_per_epoch": 100}))
    epoch = {"kind": "epoch", "train_loss": -0.05, "val_loss": -0.02, "pseudo_dice": [0.0] * 7, "epoch_seconds": 616.0}
    log("ape_k5_s0", [{"kind": "start", "epoch": 0, "compiled": False},
                      {**epoch, "epoch": 0, "iterations": 100, "organ_volume_ratio": 0.4},
                      {"kind": "start", "epoch": 1, "compiled": True},  # continued with --compile
                      {**epoch, "epoch": 1, "iterations": 200, "organ_volume_ratio": 2.5e-9, "epoch_seconds": 412.0},
                      {"kind": "start", "epoch": 2, "compiled": False}])  # continued again, no epoch yet
    log("scratch_k5_s0", [{**epoch, "epoch": 0, "iterations": 100, "pseudo_dice": [0.05] + [0.0] * 5 + [0.7]},  # logged before the check
                          {**epoch, "epoch": 1, "iterations": 200, "pseudo_dice": [0.3] + [0.0] * 5 + [0.4]}])
    log("scratch_k5_s1", [{"kind": "start", "epoch": 0}])  # started, no epoch yet
    organs = ["brainstem", "spinal_cord", "parotid_right", "parotid_left", "esophagus", "larynx", "mandible"]
    lines = finetune_report.training_view(tmp_path, organs)
    rows = [line for line in lines if line.startswith("| ") and "_k5_" in line]
    assert rows == ["| ape_k5_s0 | 200 | -0.050 | -0.020 | 0.000 | 2.5e-09 | 4.12 (compiled) | none |",
                    "| scratch_k5_s0 | 200 | -0.050 | -0.020 | 0.100 | - | 6.16 | mandible 100, brainstem 200 |"]
    assert finetune_report.training_view(tmp_path / "nothing", organs) == []
