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



def test_help_and_usage_errors_answer_without_importing_torch():
    """``--help`` and argparse's usage errors must not wait seconds for torch, scipy or nnU-Net to import."""
    code = (
        "import sys\n"
        "from nnunet_ape.cli import main\n"
        "for argv in (['--help'], ['pretrain', 'ape', '--help'], ['pretrain', 'bpr', '--help'], ['localize', 'fit', '--help'], ['embed']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('imported:', *[m for m in ('torch', 'scipy', 'SimpleITK', 'nnunetv2') if m in sys.modules], file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "usage: nnunet-ape embed" in result.stderr  # the usage error was reached
    assert result.stderr.strip().splitlines()[-1] == "imported:"
