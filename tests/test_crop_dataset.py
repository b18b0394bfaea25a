"""crop-dataset, channels-dataset and uncrop on a raw dataset of real CT (patients A and B) and phantoms."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import announced
from nnunet_datasets import ORGANS, write_raw_dataset
from nnunet_ape.cli import main
from nnunet_ape.io import read_volume


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("nnunet")
    out = {k: base / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for p in out.values():
        p.mkdir()
    print("\n[crop-dataset tests] writing a raw dataset of patients A, B and 2 phantoms", flush=True)
    write_raw_dataset(out["nnUNet_raw"] / "Dataset501_Abd", phantom_seeds=(1,), test_phantoms=(3,))
    return out


@pytest.fixture()
def env(roots, monkeypatch) -> dict[str, Path]:
    for key, path in roots.items():
        monkeypatch.setenv(key, str(path))
    return roots


@pytest.fixture(scope="module")
def tight_localizer(pretrained_run, roots, tmp_path_factory) -> Path:
    """A localizer fitted on A and B whose boxes are not enlarged (alpha 1): tight enough that training boxes
    must grow to hold their labels."""
    from nnunet_ape.cases import cases_from_nnunet
    from nnunet_ape.localize.fit import fit_localizer
    from nnunet_ape.localize.localizer import save_localizer

    cases = [c for c in cases_from_nnunet(str(roots["nnUNet_raw"] / "Dataset501_Abd")) if c.name in ("A", "B")]
    localizer = fit_localizer(cases, {o: i for i, o in enumerate(ORGANS, 1)}, pretrained_run / "checkpoint_final.pt", method="ape",
                              enlargement="alpha")  # alpha 1 below: tight boxes
    for entry in localizer["organs"].values():
        entry["alpha"] = 1.0
    return save_localizer(localizer, tmp_path_factory.mktemp("loc") / "tight.json")


def _run(*args: str) -> int:
    return main([*map(str, args)])


def _datasets(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


@pytest.fixture(scope="module")
def liver_crops(roots, tight_localizer, pretrained_run) -> tuple[Path, int]:
    """Dataset601: liver crops of Dataset501 with APE channels (written once for the tests of this module)."""
    with pytest.MonkeyPatch.context() as mp, announced("crop-dataset: liver crops with APE channels of 4 cases"):
        for key, path in roots.items():
            mp.setenv(key, str(path))
        code = _run("crop-dataset", "-d", "501", "-l", tight_localizer, "--organs", "liver", "-o", "601", "--channels", "ape",
                    "--device", "cpu")
    return roots["nnUNet_raw"] / "Dataset601_AbdLiverCrop", code


def test_crop_dataset_layout_labels_and_manifest(liver_crops, env, pretrained_run):
    target, code = liver_crops
    assert code == 0
    dataset = json.loads((target / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "liver": 1}
    assert list(dataset["channel_names"].values()) == ["CT", "noNorm", "noNorm", "noNorm"] and dataset["numTraining"] == 3
    assert dataset["nnunet_ape"]["channels"] == ["CT", "APE_x", "APE_y", "APE_z"]
    manifest = json.loads((target / "crops.json").read_text())
    assert len(manifest["ape_sha256"]) == 64 and manifest["localizer"].endswith("tight.json")
    assert manifest["target_to_source_label"] == {"1": 1}
    cases = {c["case"]: c for c in manifest["cases"]}
    assert set(cases) == {"A", "B", "phantom001", "phantom003"} and cases["phantom003"]["split"] == "test"
    assert sorted(p.name for p in (target / "imagesTs").iterdir()) == [f"phantom003_{k:04d}.nii.gz" for k in range(4)]
    for name, entry in cases.items():
        folder = "imagesTr" if entry["split"] == "train" else "imagesTs"
        ct = read_volume(target / folder / f"{name}_0000.nii.gz")
        source = read_volume(entry["source_images"][0])
        box = np.asarray(entry["box_voxels"])
        assert list(ct.shape) == entry["crop_shape"] == (box[1] - box[0]).tolist()
        assert np.allclose(ct.origin, source.index_to_physical(box[0].astype(float)), atol=1e-3)  # overlays its source
        assert np.array_equal(ct.array, source.array[tuple(slice(a, b) for a, b in zip(*box))])  # no resampling
        assert entry["source"]["size"] == list(source.shape) and np.allclose(entry["source"]["direction"], source.direction.ravel())
        if entry["split"] == "train":
            label = read_volume(target / "labelsTr" / f"{name}.nii.gz").array
            source_label = read_volume(entry["source_label"]).array
            assert set(np.unique(label)) <= {0, 1}  # spleen (source 2) dropped, liver renumbered 1
            assert (label == 1).sum() == (source_label == 1).sum()  # the whole liver is inside the crop
        else:
            assert box.tolist() == entry["predicted_box_voxels"]  # test cases keep the localizer's box
    # the localizer's boxes are tight (alpha 1): some training boxes had to grow, and the manifest says by how much
    assert manifest["summary"]["training_boxes_grown"] >= 1
    grown = [c for c in cases.values() if c.get("grown")]
    assert all(max(max(g) for g in c["grown_mm"]) > 0 and c["organ_fraction_in_predicted_box"]["liver"] < 1 for c in grown)


def test_ape_channels_are_the_whole_ct_map_cropped(liver_crops, env, pretrained_run):
    from nnunet_ape.checkpoint import load_ape_model
    from nnunet_ape.embed import embed_volume, stored_settings

    target, _ = liver_crops
    entry = next(c for c in json.loads((target / "crops.json").read_text())["cases"] if c["case"] == "B")
    model, state = load_ape_model(pretrained_run / "checkpoint_final.pt")
    full = embed_volume(model, read_volume(entry["source_images"][0]), stored_settings(state), progress=False).array
    box = np.asarray(entry["box_voxels"])
    for k in range(3):
        channel = read_volume(target / "imagesTr" / f"B_{k + 1:04d}.nii.gz")
        expected = full[tuple(slice(a, b) for a, b in zip(*box))][..., k]
        assert np.allclose(channel.array, expected, atol=1e-4)
        assert 0.05 < np.abs(channel.array).mean() < 5  # O(1)


def test_uncrop_pastes_labels_back_onto_the_source(liver_crops, env, tmp_path):
    target, _ = liver_crops
    predictions = tmp_path / "pred"  # stand-in for nnUNetv2_predict output: the crops' own labels and dataset.json
    shutil.copytree(target / "labelsTr", predictions)
    shutil.copy(target / "dataset.json", predictions / "dataset.json")
    assert _run("uncrop", "-i", predictions, "-o", tmp_path / "seg") == 0
    manifest = json.loads((target / "crops.json").read_text())
    for entry in (c for c in manifest["cases"] if c["split"] == "train"):
        out = read_volume(tmp_path / "seg" / f"{entry['case']}.nii.gz")
        source = read_volume(entry["source_label"])
        assert out.same_geometry(read_volume(entry["source_images"][0]), atol=1e-4)
        assert np.array_equal(out.array, np.where(source.array == 1, 1, 0))  # source value of liver; spleen not predicted


def test_keep_labels_and_bpr_channel_in_a_channels_dataset(env, tight_localizer, bpr_run, capsys):
    assert _run("crop-dataset", "-d", "501", "-l", tight_localizer, "--organs", "spleen", "-o", "602", "--keep-labels", "--device", "cpu") == 0
    kept = env["nnUNet_raw"] / "Dataset602_AbdSpleenCrop"
    assert json.loads((kept / "dataset.json").read_text())["labels"] == {"background": 0, "liver": 1, "spleen": 2}
    entry = next(c for c in json.loads((kept / "crops.json").read_text())["cases"] if c["case"] == "A")
    box = tuple(slice(a, b) for a, b in zip(*entry["box_voxels"]))
    assert np.array_equal(read_volume(kept / "labelsTr" / "A.nii.gz").array, read_volume(entry["source_label"]).array[box])
    code = _run("channels-dataset", "-d", "501", "--bpr-model", bpr_run / "checkpoint_final.pt", "--channels", "bpr", "-o", "603",
                "--num-processes", "2", "--device", "cpu")
    assert code == 0
    whole = env["nnUNet_raw"] / "Dataset603_AbdBPR"
    ct, bpr = read_volume(whole / "imagesTr" / "A_0000.nii.gz"), read_volume(whole / "imagesTr" / "A_0001.nii.gz")
    assert ct.same_geometry(bpr) and ct.shape == read_volume(env["nnUNet_raw"] / "Dataset501_Abd" / "imagesTr" / "A_0000.nii.gz").shape
    per_slice = bpr.array.reshape(-1, bpr.shape[2])
    assert np.allclose(per_slice, per_slice[:1])  # one score per axial slice
    assert abs(np.corrcoef(per_slice[0], np.arange(bpr.shape[2]))[0, 1]) > 0.5  # scores follow z


def test_a_killed_run_resumes_in_parts_and_skips_finished_cases(env, tight_localizer, monkeypatch):
    import nnunet_ape.nnunet.crop_dataset as job_module

    original, calls = job_module.process_case, []

    def dies_after_two(case, split, job, models):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is killed
        calls.append(case.case_id)
        return original(case, split, job, models)

    monkeypatch.setattr(job_module, "process_case", dies_after_two)
    args = ("crop-dataset", "-d", "501", "-l", tight_localizer, "--organs", "liver", "-o", "604", "--device", "cpu")
    with pytest.raises(KeyboardInterrupt):
        _run(*args)
    assert "Dataset604_AbdLiverCrop" not in _datasets(env["nnUNet_raw"])  # nnU-Net never sees half a dataset
    first = list(calls)
    assert first == ["A", "B"]
    calls.clear()
    monkeypatch.setattr(job_module, "process_case", lambda *a: (calls.append(a[0].case_id), original(*a))[1])
    # resumed as two parts (cases A, B, phantom001, phantom003; part 1 owns B and phantom003): each skips what is done,
    # and the dataset appears only when the last part finishes
    assert _run(*args, "--num-parts", "2", "--part-id", "1") == 0
    assert calls == ["phantom003"] and "Dataset604_AbdLiverCrop" not in _datasets(env["nnUNet_raw"])
    assert _run(*args, "--num-parts", "2", "--part-id", "0") == 0
    assert calls == ["phantom003", "phantom001"]
    assert "Dataset604_AbdLiverCrop" in _datasets(env["nnUNet_raw"])
    assert not any(n.startswith(".") and n != ".nnunet_ape" for n in _datasets(env["nnUNet_raw"]))  # .nnunet_ape: locks
    manifest = json.loads((env["nnUNet_raw"] / "Dataset604_AbdLiverCrop" / "crops.json").read_text())
    assert [c["case"] for c in manifest["cases"]] == ["A", "B", "phantom001", "phantom003"]


@pytest.mark.parametrize("problem", ["id_taken_in_results", "unknown_organ", "organ_not_fitted", "missing_label",
                                     "no_dataset_json", "channel_count", "other_checkpoint", "channel_without_model"])
def test_bad_input_is_one_line_and_writes_nothing(problem, env, tight_localizer, pretrained_run, tmp_path, capsys):
    source = env["nnUNet_raw"] / "Dataset501_Abd"
    args = ["crop-dataset", "-d", "501", "-l", tight_localizer, "--organs", "liver", "-o", "650", "--device", "cpu"]
    if problem == "id_taken_in_results":
        (env["nnUNet_results"] / "Dataset650_Old").mkdir()
    elif problem == "unknown_organ":
        args[6] = "pancreas"
    elif problem == "organ_not_fitted":
        broken = tmp_path / "Dataset777_More"
        shutil.copytree(source, broken, symlinks=True)
        spec = json.loads((broken / "dataset.json").read_text())
        spec["labels"]["kidney_left"] = 3
        (broken / "dataset.json").write_text(json.dumps(spec))
        args[2], args[6] = str(broken), "kidney_left"
    elif problem in ("missing_label", "no_dataset_json", "channel_count"):
        broken = tmp_path / "Dataset778_Broken"
        shutil.copytree(source, broken, symlinks=True)
        if problem == "missing_label":
            (broken / "labelsTr" / "B.nii.gz").unlink()
        elif problem == "no_dataset_json":
            (broken / "dataset.json").unlink()
        else:
            spec = json.loads((broken / "dataset.json").read_text())
            spec["channel_names"]["1"] = "noNorm"
            (broken / "dataset.json").write_text(json.dumps(spec))
        args[2] = str(broken)
    elif problem == "other_checkpoint":
        args += ["-m", str(pretrained_run / "checkpoint_last.pt")]
    elif problem == "channel_without_model":
        args[3:5] = []  # no localizer: channels-dataset without -m
        args[0] = "channels-dataset"
        args += ["--channels", "ape"]
        args = [a for a in args if a not in ("--organs", "liver")]
    before = _datasets(env["nnUNet_raw"])
    assert _run(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nnunet-ape: error:") and "\n" not in err
    assert _datasets(env["nnUNet_raw"]) == before
    if problem == "id_taken_in_results":
        assert "650" in err and "exists" in err
        (env["nnUNet_results"] / "Dataset650_Old").rmdir()



def test_a_rerun_on_a_finished_dataset_says_so_and_clears_old_temporary_files(liver_crops, env, tight_localizer, capsys):
    target, _ = liver_crops
    old = target / "imagesTr" / ".tmp_bu0vfue0.nii.gz"  # what atomic_path left beside its targets until 2026-12-05
    old.write_bytes(b"")
    args = ("crop-dataset", "-d", "501", "-l", tight_localizer, "--organs", "liver", "-o", "601", "--channels", "ape", "--device", "cpu")
    assert _run(*args) == 0
    out = capsys.readouterr().out
    assert "removed 1 temporary file(s)" in out and "already complete" in out and not old.exists()
    assert _run(*args[:-4], "--device", "cpu") == 2  # the same id with other settings (no channels): refused
    assert "already exists" in capsys.readouterr().err
