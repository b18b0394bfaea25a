"""Command line: help on every command, demo end to end on phantoms."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from nnunet_ape.cli import build_parser, main
from nnunet_ape.demo import DEMO_ITERATIONS, run_demo


@pytest.mark.parametrize(
    "command",
    [[], ["demo"], ["pretrain"], ["pretrain", "ape"], ["embed"], ["localize"], ["localize", "fit"], ["localize", "predict"],
     ["evaluate"], ["evaluate", "localization"], ["evaluate", "bpr"], ["pretrain", "bpr"], ["score"], ["calibrate"],
     ["crop-dataset"], ["channels-dataset"], ["uncrop"], ["plan"], ["preprocess"], ["trainers-path"]],
)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*command, "--help"])
    assert info.value.code == 0
    assert len(capsys.readouterr().out) > 200


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "nnunet_ape", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "pretrain" in result.stdout and "embed" in result.stdout


def test_demo_end_to_end_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    report = run_demo(out, cases=3, minutes=0.2, model="tiny", device="cpu", workers=1)  # 2000 iterations do not fit
    text = report.read_text()
    done = torch.load(out / "ape" / "checkpoint_final.pt", weights_only=False)["iteration"]
    assert 0 < done < DEMO_ITERATIONS
    assert f"cut short: the 0.2-minute cap ended it after {done} of {DEMO_ITERATIONS} iterations" in text
    assert f"ended the run after {done} of {DEMO_ITERATIONS} iterations" in capsys.readouterr().err
    r2 = float(re.search(r"R\^2 = (-?[0-9.]+)", text).group(1))
    assert -1.0 <= r2 <= 1.0
    for name in ("heldout_ape.nii.gz", "heldout_ape.png", "ape/loss.png", "ape/checkpoint_final.pt", "cohort/dataset.json"):
        assert (out / name).exists(), name
    crops = out / "nnUNet_raw" / "Dataset900_DemoLiverCrop"  # the nnU-Net crop dataset of the cohort
    manifest = json.loads((crops / "crops.json").read_text())
    assert json.loads((crops / "dataset.json").read_text())["labels"] == {"background": 0, "liver": 1}
    assert len(list((crops / "imagesTr").iterdir())) == len(manifest["cases"]) == 4
    assert "nnU-Net crop dataset" in text and "nnunet-ape uncrop" in text
    assert main(["demo", "-o", str(out), "--cases", "3", "--minutes", "0.1", "--model", "tiny", "--device", "cpu"]) == 2
    assert "already exists" in capsys.readouterr().err
    # resumed to an iteration count it reaches: trained exactly that far, and the report no longer warns
    text = run_demo(out, cases=3, minutes=5, device="cpu", workers=1, resume=True, iterations=done + 20).read_text()
    assert torch.load(out / "ape" / "checkpoint_final.pt", weights_only=False)["iteration"] == done + 20
    assert "cut short" not in text and f"pretraining: {done + 20} iterations" in text
