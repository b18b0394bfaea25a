"""Shared fixtures: the real CT of ../shared/data (or $NNUNET_APE_TEST_DATA) and short APE and BPR pretraining runs."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NNUNET_APE_TEST_DATA", REPO.parent / "shared" / "data" / "ct"))

PATIENTS = {
    "A": "ts_a_abdomen_pelvis_ct.nii.gz",
    "B": "ts_b_upper_abdomen_ct.nii.gz",
    "B_dicom": "ts_b_upper_abdomen_dicom",
    "C": "ts_c_chest_cta_ct.nii.gz",
    "D": "radiomics_lung1_ct.nrrd",
    "E": "radiomics_lung2_ct.nrrd",
}


_PYTEST: list = []  # pytest's config, once pytest has configured itself


def cli_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """``nnunet-ape ARGS`` in this process (no interpreter and torch start-up per call); returns (exit code, stdout,
    stderr) of that call alone."""
    from nnunet_ape.cli.main import main

    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def pytest_configure(config: pytest.Config) -> None:
    _PYTEST.append(config)


def say(line: str) -> None:
    """Write ``line`` on the terminal past pytest's output capture (plain print outside pytest)."""
    config = _PYTEST[0] if _PYTEST else None
    reporter = config.pluginmanager.get_plugin("terminalreporter") if config else None
    capture = config.pluginmanager.get_plugin("capturemanager") if config else None
    if reporter is None or capture is None:
        print(line, flush=True)
        return
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        reporter.write_line(line)
        reporter.flush()


@contextlib.contextmanager
def announced(text: str):
    """Say what a slow fixture is doing, and when it is done: a user must not take minutes of silence for a hang."""
    began = time.monotonic()
    say(f"[fixture] {text} ...")
    yield
    say(f"[fixture] {text}: done in {time.monotonic() - began:.0f} s")


def patient(key: str) -> Path:
    """Path of a real CT of the shared data (skips the test when the data is not there)."""
    path = DATA / PATIENTS[key]
    if not path.exists():
        pytest.skip(f"real CT not found: {path} (set NNUNET_APE_TEST_DATA)")
    return path


def real_patients() -> list[Path]:
    """Patients A-E (one file each)."""
    return [patient(k) for k in ("A", "B", "C", "D", "E")]


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory) -> Path:
    """A short CPU pretraining of the tiny APE on the real patients A-E; returns its run folder.

    Settings favour fast learning (naive variant, larger learning rate with cosine decay, no masking) so that the embedding tests check a map
    that already encodes position; the variants themselves are exercised in test_pretrain.py.
    """
    from nnunet_ape.pretrain.augment import AugmentConfig
    from nnunet_ape.pretrain.batches import BatchConfig
    from nnunet_ape.pretrain.train_ape import PretrainConfig, pretrain_ape

    run = tmp_path_factory.mktemp("pretrained") / "run"
    cfg = PretrainConfig(
        iterations=1000,
        lr=2e-3,
        lr_schedule="cosine",
        model="tiny",
        batch=BatchConfig(variant="naive", pairs=4, voxels=1024, patch_volume=300_000, augment=AugmentConfig(p_mask=0.0)),
        device="cpu",
        workers=2,
        checkpoint_every=250,
    )
    with announced("pretraining the tiny APE on patients A-E for 1000 iterations (shared by the APE tests)"):
        pretrain_ape(real_patients(), run, cfg)
    return run


def labeled_patient(key: str):
    """Patient A or B as a LabeledCase (CT, TotalSegmentator label map, label names)."""
    from nnunet_ape.cases import LabeledCase, read_label_names

    stem = {"A": "ts_a_abdomen_pelvis", "B": "ts_b_upper_abdomen"}[key]
    image = patient(key)
    return LabeledCase(key, image, DATA / f"{stem}_seg.nii.gz", read_label_names(DATA / f"ts_{key.lower()}_labels.json"))


@pytest.fixture(scope="session")
def bpr_run(tmp_path_factory) -> Path:
    """A 300-iteration CPU pretraining of the tiny BPR trunk on patients A-E (about 30 s); returns its run folder."""
    from nnunet_ape.bpr.train_bpr import BPRConfig, pretrain_bpr

    run = tmp_path_factory.mktemp("bpr") / "run"
    # augmentations off: they slow down the first few hundred iterations (tests/test_bpr_augment.py covers them)
    cfg = BPRConfig(iterations=300, lr=1e-3, trunk="tiny", device="cpu", workers=2, checkpoint_every=100, augment="none")
    with announced("pretraining the tiny BPR trunk on patients A-E for 300 iterations (shared by the BPR tests)"):
        pretrain_bpr(real_patients(), run, cfg)
    return run
