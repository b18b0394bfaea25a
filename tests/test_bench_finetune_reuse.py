"""bench_pretrain_finetune --pretraining-from: a new work folder starts from another's finished pretraining."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import headneck_finetune as ft  # noqa: E402

DATASET = ft.seg.DATASET


def _finished_source(root: Path) -> Path:
    """A work folder as the benchmark leaves it after pretraining and one fine-tuning run (files are stand-ins)."""
    source = root / "first"
    fold = ft.results_folder(source, ft.PRETRAIN_TRAINER) / "fold_0"
    fold.mkdir(parents=True)
    (fold / "checkpoint_final.pth").write_bytes(b"weights")
    pre = source / "nnUNet_preprocessed" / DATASET
    (pre / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    (pre / "nnUNetPlans_3d_fullres" / "hn_001.b2nd").write_bytes(b"data")
    model = source / "finetune" / "ape_standalone" / "checkpoint_final.pt"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"ape")
    (pre / "nnUNetPlansCPU.json").write_text(json.dumps({"models": {"ape_checkpoint": str(model)}, "root": str(source)}))
    (pre / "splits_final.json").write_text(json.dumps([{"train": ["hn_001"], "val": ["hn_002"]}]))
    (source / "nnUNet_raw" / DATASET).mkdir(parents=True)
    (source / "nnUNet_raw" / DATASET / "split.json").write_text(json.dumps({"train": ["hn_001"], "test": []}))
    (source / "prepared.json").write_text(json.dumps({"train_cases": 1}))
    (source / "finetune" / "settings.json").write_text(json.dumps({"pretrain_iterations": 1000, "epochs": 20}))
    (source / "finetune" / "pretrain_seconds.jsonl").write_text(json.dumps({"seconds": 3600.0, "finished": True}) + "\n")
    (source / "finetune" / "scratch_k5_s0").mkdir()
    (source / "finetune" / "folds.json").write_text("{}")
    return source


def test_a_new_work_folder_takes_the_data_and_pretraining_but_not_the_runs(tmp_path):
    source = _finished_source(tmp_path)
    work = tmp_path / "longer"
    record = ft.adopt_pretraining(source, work)

    assert record == {"source": str(source.resolve()), "pretrain_iterations": 1000, "pretrain_seconds": 3600.0}
    assert (ft.results_folder(work, ft.PRETRAIN_TRAINER) / "fold_0" / "checkpoint_final.pth").read_bytes() == b"weights"
    assert ft.pretrain_seconds(work) == 3600.0  # the channels variant's budget comes along
    assert (work / "nnUNet_preprocessed" / DATASET / "nnUNetPlans_3d_fullres" / "hn_001.b2nd").read_bytes() == b"data"
    plans = json.loads((work / "nnUNet_preprocessed" / DATASET / "nnUNetPlansCPU.json").read_text())
    assert plans["models"]["ape_checkpoint"] == str(work.resolve() / "finetune" / "ape_standalone" / "checkpoint_final.pt")
    assert plans["root"] == str(work.resolve())
    assert Path(plans["models"]["ape_checkpoint"]).read_bytes() == b"ape"
    # the schedule is the new folder's own: only the pretraining's iteration count is fixed
    assert json.loads((work / "finetune" / "settings.json").read_text()) == {"pretrain_iterations": 1000}
    settings = ft.settings_of(work, {"epochs": 40, "iterations_per_epoch": 100})
    assert settings["epochs"] == 40 and settings["iterations_per_epoch"] == 100 and settings["pretrain_iterations"] == 1000
    with pytest.raises(SystemExit, match="pretrain-iterations 1000"):
        ft.settings_of(work, {"pretrain_iterations": 500})
    assert not (work / "finetune" / "scratch_k5_s0").exists() and not (work / "finetune" / "folds.json").exists()
    # copies, not links: the new runs rewrite splits_final.json without touching the source's
    (work / "nnUNet_preprocessed" / DATASET / "splits_final.json").write_text("[]")
    assert json.loads((source / "nnUNet_preprocessed" / DATASET / "splits_final.json").read_text())[0]["train"] == ["hn_001"]

    assert ft.adopt_pretraining(source, work) == record  # the same command again continues


def test_refuses_an_unfinished_source_or_a_used_work_folder(tmp_path):
    source = _finished_source(tmp_path)
    (ft.results_folder(source, ft.PRETRAIN_TRAINER) / "fold_0" / "checkpoint_final.pth").unlink()
    with pytest.raises(SystemExit, match="has not finished"):
        ft.adopt_pretraining(source, tmp_path / "new")
    assert not (tmp_path / "new").exists()

    source = _finished_source(tmp_path / "b")
    used = tmp_path / "used"
    (used / "finetune").mkdir(parents=True)
    (used / "prepared.json").write_text("{}")
    with pytest.raises(SystemExit, match="needs a new --work"):
        ft.adopt_pretraining(source, used)

    ft.adopt_pretraining(source, tmp_path / "taken")
    other = _finished_source(tmp_path / "c")
    with pytest.raises(SystemExit, match="was started from the pretraining of"):
        ft.adopt_pretraining(other, tmp_path / "taken")


def test_a_killed_copy_is_completed_by_the_rerun(tmp_path):
    source = _finished_source(tmp_path)
    work = tmp_path / "longer"
    # what a kill during the copy leaves: part of the data, no prepared.json, no marker
    partial = work / "nnUNet_preprocessed" / DATASET / "nnUNetPlans_3d_fullres"
    partial.mkdir(parents=True)
    (partial / "hn_001.b2nd").write_bytes(b"da")
    (partial / "stray.tmp").write_bytes(b"")
    ft.adopt_pretraining(source, work)
    assert (partial / "hn_001.b2nd").read_bytes() == b"data" and not (partial / "stray.tmp").exists()
    assert (work / "prepared.json").exists() and (work / "finetune" / ft.ADOPTED).exists()
