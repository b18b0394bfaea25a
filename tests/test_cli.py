"""Command line: help on every command, the console script (the demo: tests/test_demo.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nnunet_ape.cli import build_parser


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

