"""``nnunet-ape unlabeled-dataset``: unlabeled CT as an nnU-Net raw dataset (body labels) that stock nnU-Net plans and
preprocesses, and that nnUNetTrainerAPEPretrain trains on."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DATA, patient
from nnunet_datasets import run_tool, tiny_plans
from nnunet_ape.io import read_volume
from nnunet_ape.nnunet.unlabeled_dataset import body_label, case_names


def test_body_label_ignores_scanner_padding_and_keeps_the_lungs():
    abdomen = read_volume(DATA / "crlm_1004_abdomen_ct.nii.gz")  # -3024 outside the scan circle
    assert (abdomen.array == -3024).mean() > 0.05
    body = body_label(abdomen)
    assert body.same_geometry(abdomen) and body.array.dtype == np.uint8
    assert not body.array[abdomen.array < -1100].any()  # padding and air are never body
    assert 0.2 < body.array.mean() < 0.6
    chest = read_volume(patient("D"))
    body = body_label(chest).array.astype(bool)
    assert (chest.array[body] < -500).mean() > 0.1  # the lungs, enclosed in each axial slice, are body


def test_case_names_are_unique():
    assert case_names([Path("a/ct.nii.gz"), Path("b/ct.nii.gz"), Path("c/x_0000.nrrd")]) == ["ct", "ct_2", "x"]


def _unlabeled_dataset(tmp_path: Path) -> tuple[dict, dict, Path]:
    """Write Dataset701_Body from patients A and B (DICOM) and check it, its refusal and its resume; returns the nnU-Net
    environment, its folders and the dataset folder."""
    roots = {k: tmp_path / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for p in roots.values():
        p.mkdir()
    trainers = Path(__file__).resolve().parents[1] / "trainers"
    env = {**os.environ, **{k: str(v) for k, v in roots.items()}, "nnUNet_extTrainer": str(trainers),
           "nnUNet_def_n_proc": "2", "nnUNet_n_proc_DA": "2", "OMP_NUM_THREADS": "2"}
    images = [patient("A"), patient("B_dicom")]
    out = run_tool(env, "unlabeled", "nnunet-ape", "unlabeled-dataset", "-i", *map(str, images), "-o", "701", "--name", "Body").stdout
    assert "2 CT(s)" in out
    dataset = roots["nnUNet_raw"] / "Dataset701_Body"
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "body": 1} and meta["numTraining"] == 2
    assert (dataset / "imagesTr" / "ts_a_abdomen_pelvis_ct_0000.nii.gz").is_symlink()  # NIfTI linked
    converted = sitk.ReadImage(str(dataset / "imagesTr" / "ts_b_upper_abdomen_dicom_0000.nii.gz"))  # DICOM converted
    label = sitk.ReadImage(str(dataset / "labelsTr" / "ts_b_upper_abdomen_dicom.nii.gz"))
    assert converted.GetSize() == label.GetSize() and np.allclose(converted.GetOrigin(), label.GetOrigin())

    # a taken id: one line, exit 2, nothing written
    done = run_tool(env, "unlabeled", "nnunet-ape", "unlabeled-dataset", "-i", str(images[0]), "-o", "701", expect_ok=False)
    assert done.returncode == 2 and "already exists" in done.stderr and len(done.stderr.strip().splitlines()) == 1

    # a killed run leaves its partial folder; the rerun keeps the cases it had written
    partial = roots["nnUNet_raw"] / ".Dataset702_Again.partial"
    shutil.copytree(dataset, partial, symlinks=True)
    (partial / "dataset.json").unlink()
    (partial / "labelsTr" / "ts_b_upper_abdomen_dicom.nii.gz").unlink()
    out = run_tool(env, "unlabeled", "nnunet-ape", "unlabeled-dataset", "-i", *map(str, images), "-o", "702", "--name", "Again").stdout
    assert "1 case(s) written by an earlier run are kept" in out and not partial.exists()
    assert (roots["nnUNet_raw"] / "Dataset702_Again" / "labelsTr" / "ts_b_upper_abdomen_dicom.nii.gz").is_file()
    return env, roots, dataset


def test_unlabeled_dataset_is_written_refused_and_resumed(tmp_path):
    _unlabeled_dataset(tmp_path)


@pytest.mark.slow
def test_unlabeled_dataset_plans_and_pretrains(tmp_path):
    env, roots, dataset = _unlabeled_dataset(tmp_path)
    # stock nnU-Net accepts it, and the APE pretraining trainer trains on it
    out = run_tool(env, "unlabeled", "nnUNetv2_plan_and_preprocess", "-d", "701", "-c", "3d_fullres", "-np", "2",
                   "--verify_dataset_integrity").stdout
    assert "verify_dataset_integrity Done" in out
    plans = roots["nnUNet_preprocessed"] / dataset.name / "nnUNetPlans.json"
    window = json.loads(plans.read_text())["foreground_intensity_properties_per_channel"]["0"]
    assert window["percentile_00_5"] < -500 and window["percentile_99_5"] > 200  # the whole body, lungs to bone
    tiny_plans(plans, "3d_fullres")
    out = run_tool(env, "unlabeled", "nnUNetv2_train", "701", "3d_fullres", "all", "-tr", "nnUNetTrainerAPEPretrain_smoke",
                   "-device", "cpu").stdout
    assert "APE train_loss" in out
    assert (roots["nnUNet_results"] / dataset.name / "nnUNetTrainerAPEPretrain_smoke__nnUNetPlans__3d_fullres" / "fold_all"
            / "checkpoint_final.pth").is_file()
