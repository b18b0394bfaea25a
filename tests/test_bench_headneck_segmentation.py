"""The head-and-neck segmentation benchmark's pipeline (benchmarks/bench_headneck_segmentation.py) on 10 training
and 2 test cases with a handful of iterations: every stage it implements runs, resumes, pastes its predictions back
onto the source grids and is scored per organ. Slow (nnU-Net planning, preprocessing and three trainings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import announced

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_headneck_segmentation.py"
HEADNECK = Path(__file__).resolve().parents[2] / "shared" / "data" / "Dataset901_HeadNeckCT"

pytestmark = pytest.mark.slow


def _run(*args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def bench_work(tmp_path_factory, pretrained_run, bpr_run) -> Path:
    if not HEADNECK.exists():
        pytest.skip(f"head-and-neck cohort not found: {HEADNECK}")
    work = tmp_path_factory.mktemp("bench_hn")
    common = ["--work", str(work), "--train-cases", "10", "--test-cases", "2", "--epochs", "2", "--iterations-per-epoch", "3",
              "--val-iterations", "1", "--curve-every", "1", "--curve-cases", "2", "--ape-model",
              str(pretrained_run / "checkpoint_final.pt"), "--bpr-model", str(bpr_run / "checkpoint_final.pt")]
    stages = ["full", "crop", "channels", "oracle"]
    with announced("head-and-neck benchmark on 10 cases: full, crop (3 group models), channels and oracle, 2 epochs of 3 iterations"):
        _run("run", "--stages", *stages, *common)
        _run("run", "--stages", *stages, *common)  # a rerun finds everything done
        _run("run", "--stages", "crop_tight", *common, "--tight-localizer", str(work / "crop" / "localizer.json"))
    return work


def test_every_stage_pastes_back_onto_the_source_grid_and_scores_each_organ(bench_work: Path) -> None:
    labels = json.loads((HEADNECK / "dataset.json").read_text())["labels"]
    for stage in ("full", "crop", "channels", "oracle", "crop_tight"):
        scores = json.loads((bench_work / stage / "test_scores.json").read_text())
        assert scores["complete"] and len(scores["cases"]) == 2
        for case in scores["cases"]:
            pred = sitk.ReadImage(str(bench_work / stage / "test_predictions" / f"{case}.nii.gz"))
            ref = sitk.ReadImage(str(HEADNECK / "labelsTr" / f"{case}.nii.gz"))
            assert pred.GetSize() == ref.GetSize()
            assert np.allclose(pred.GetSpacing(), ref.GetSpacing()) and np.allclose(pred.GetOrigin(), ref.GetOrigin())
            assert np.allclose(pred.GetDirection(), ref.GetDirection())
            present = {name for name, v in labels.items() if v and (sitk.GetArrayViewFromImage(ref) == v).any()}
            assert set(scores["scores"][case]) == present  # every contoured organ scored, no other
            for organ in present:
                s = scores["scores"][case][organ]
                assert 0.0 <= s["dice"] <= 1.0 and {"nsd_2mm", "nsd_4mm"} <= set(s)
        if stage in ("crop", "oracle", "crop_tight"):  # localized stages: each contoured organ's share inside its model's final box
            assert all(set(scores["organ_in_box"][c]) == set(scores["scores"][c]) for c in scores["cases"])
    oracle = json.loads((bench_work / "oracle" / "test_scores.json").read_text())
    assert all(f >= 0.999 for c in oracle["cases"] for f in oracle["organ_in_box"][c].values())


def test_crop_models_are_reduced_and_logged_per_group(bench_work: Path) -> None:
    info = json.loads((bench_work / "crop" / "prepared.json").read_text())
    assert set(info["groups"]) == {"jaw", "cns", "neck"}
    plans = json.loads(next((bench_work / "nnUNet_preprocessed").glob("Dataset902_*/nnUNetPlansCPU.json")).read_text())
    for group in info["groups"].values():
        config = plans["configurations"][group["configuration"]]
        assert max(config["patch_size"]) <= 64 and config["batch_size"] <= plans["configurations"]["3d_fullres"]["batch_size"]
        assert config["architecture"]["arch_kwargs"]["features_per_stage"][0] == 16
    for group in ("jaw", "cns", "neck"):
        epochs = [json.loads(line) for line in (bench_work / "crop" / group / "training_log.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [0, 1]
        assert all(set(r["curve"]["dice"]) <= set(info["groups"][group]["organs"]) for r in epochs if "curve" in r)
    report = (bench_work / "report.md").read_text()
    assert "| crop | trained |" in report and "| oracle |" in report
    assert (bench_work / "dice_vs_training_time.png").stat().st_size > 10_000


def test_channels_model_trains_on_ct_plus_four_embedding_channels(bench_work: Path) -> None:
    info = json.loads((bench_work / "channels" / "prepared.json").read_text())
    plans = json.loads(next((bench_work / "nnUNet_preprocessed").glob("Dataset902_*/nnUNetPlansCPU.json")).read_text())
    assert info["configuration"] in plans["configurations"]
    case = next((bench_work / "nnUNet_preprocessed").glob(f"Dataset902_*/*{info['configuration']}*/*.b2nd"))
    import blosc2

    assert blosc2.open(str(case), mode="r").shape[0] == 5  # CT + APE x, y, z + BPR
    epochs = [json.loads(line) for line in (bench_work / "channels" / "training_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [0, 1]
    assert "| channels | trained |" in (bench_work / "report.md").read_text()
