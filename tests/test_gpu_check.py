"""``benchmarks/gpu_check.sh`` (issue 29): the prepared first run on a CUDA machine. Here, without a GPU: its
refusal, its commands (``--dry-run``), a failing step, and (slow) every step at toy size on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _run(tmp_path: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """The script with this Python, and an ``nvidia-smi`` first on PATH that fails (no GPU, even on a GPU machine)."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_gpu_check_refuses_without_a_gpu_and_dry_run_lists_every_step(tmp_path):
    refused = _run(tmp_path)
    assert refused.returncode == 2 and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1 and "no CUDA GPU" in refused.stderr

    dry = _run(tmp_path, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    out = dry.stdout
    assert "in /tmp/nnunet_ape_gpu_check," in out.splitlines()[0]  # the default work folder
    assert "nnunet-ape pretrain ape" in out and "--device cuda" in out and "--no-amp" not in out  # AMP: on by default on CUDA
    for trainer in ("nnUNetTrainerAPECrop_smoke", "nnUNetTrainerAPEChannels_smoke"):
        for flag in ("0", "1"):
            assert any(line.startswith(f"nnUNet_compile={flag} ") and trainer in line for line in out.splitlines()), (trainer, flag)
    assert "-tr nnUNetTrainerAPEPretrain_smoke -device cuda -num_gpus 2" in out
    assert "--helper portable-checkpoint" in out  # its checkpoint must load without a GPU (nnU-Net main's nnssl path)
    assert "nnUNetv2_predict -i" in out and "nnunet-ape predict -i" in out and "512x512x300 CT" in out
    assert "nnUNet_extTrainer=" in out


def test_gpu_check_stops_at_the_first_failing_step_and_names_it(tmp_path):
    work = tmp_path / "work"
    done = _run(tmp_path, str(work), "--device", "cpu", "--tiny", "--steps", "5", "6")  # splits without a preprocessed dataset
    assert done.returncode == 1
    assert "step 5 'splits' failed" in done.stderr.strip().splitlines()[-1] and "| splits |" in done.stdout
    assert (work / "logs").is_dir() and "nnunet-ape plan" not in done.stdout  # nothing after the failure ran


@pytest.mark.slow
def test_gpu_check_runs_every_step_at_toy_size_on_cpu(tmp_path):
    work = tmp_path / "work"
    done = _run(tmp_path, str(work), "--device", "cpu", "--tiny", timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all steps passed" in done.stdout
    table = done.stdout[done.stdout.index("| # | step |"):]
    assert "| nnunet-ape predict (liver crop) |" in table and "skipped: no CUDA" in table
    assert "of the voxels agree" in (work / "logs").joinpath(next(p.name for p in (work / "logs").iterdir() if "compare" in p.name)).read_text()
