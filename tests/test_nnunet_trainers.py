"""APE configurations on an existing, normally planned dataset, with stock nnU-Net commands: raw dataset (patients A,
B, phantoms) -> nnUNetv2_extract_fingerprint + nnUNetv2_plan_experiment -> nnunet-ape plan -> nnunet-ape preprocess
-> nnUNetv2_train -tr nnUNetTrainerAPE..._smoke (found through nnUNet_extTrainer=trainers/, 2 data-loading worker
processes) -> nnU-Net's validation on the full images -> predictions in the full geometry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_datasets import ORGANS, run_tool, tiny_plans, write_raw_dataset

REPO = Path(__file__).resolve().parents[1]
DATASET = "Dataset501_Abd"


def _run(env: dict, *args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    return run_tool(env, "trainers", *args, expect_ok=expect_ok)


@pytest.fixture(scope="module")
def planned(pretrained_run, tmp_path_factory):
    """A raw dataset planned by nnU-Net, with APE configurations added and preprocessed; returns (env, root)."""
    from nnunet_ape.localize.cases import cases_from_nnunet
    from nnunet_ape.localize.localizer import fit_localizer, save_localizer

    root = tmp_path_factory.mktemp("ape_trainers")
    roots = {k: root / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for p in roots.values():
        p.mkdir()
    env = {**os.environ, **{k: str(v) for k, v in roots.items()}, "nnUNet_extTrainer": str(REPO / "trainers"),
           "nnUNet_def_n_proc": "2", "nnUNet_n_proc_DA": "2", "OMP_NUM_THREADS": "2"}
    source = write_raw_dataset(roots["nnUNet_raw"] / DATASET, phantom_seeds=(1, 2), test_phantoms=(3,))
    shots = [c for c in cases_from_nnunet(str(source)) if c.name in ("A", "B")]
    fitted = fit_localizer(shots, {o: i for i, o in enumerate(ORGANS, 1)}, pretrained_run / "checkpoint_final.pt")
    for entry in fitted["organs"].values():
        entry["alpha"] = 1.0  # tight boxes: real crops, and training boxes that must grow to hold their labels
    localizer = save_localizer(fitted, root / "localizer.json")
    _run(env, "nnUNetv2_extract_fingerprint", "-d", "501", "-np", "2")
    _run(env, "nnUNetv2_plan_experiment", "-d", "501")
    preprocessed = roots["nnUNet_preprocessed"] / DATASET
    stock_plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())

    out = _run(env, "nnunet-ape", "plan", "-d", "501", "-l", str(localizer), "--organs", "liver").stdout
    assert "3d_fullres_ape_liver: crop, added; train with -tr nnUNetTrainerAPECrop" in out
    _run(env, "nnunet-ape", "plan", "-d", "501", "-l", str(localizer), "--organs", "liver", "--channels", "ape")
    _run(env, "nnunet-ape", "plan", "-d", "501", "-m", str(pretrained_run / "checkpoint_final.pt"), "--channels", "ape")
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["3d_fullres"] == stock_plans["configurations"]["3d_fullres"]  # untouched
    assert len(list(preprocessed.glob("nnUNetPlans.json.bak-*"))) == 3

    out = _run(env, "nnunet-ape", "preprocess", "-d", "501", "-c", "3d_fullres_ape_liver", "3d_fullres_ape_liver_ape",
               "-np", "2", "--device", "cpu").stdout
    assert "training boxes grown to hold their labels" in out and "planned for the crops: patch size" in out
    planned_crop = json.loads((preprocessed / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres_ape_liver"]
    # nnU-Net's planner, for the crops' median shape: the patch fits the crops, not the full images
    assert all(p <= 2 * m for p, m in zip(planned_crop["patch_size"], planned_crop["median_image_size_in_voxels"]))
    assert np.prod(planned_crop["patch_size"]) < np.prod(stock_plans["configurations"]["3d_fullres"]["patch_size"])
    tiny_plans(preprocessed / "nnUNetPlans.json", "3d_fullres", "3d_fullres_ape_liver", "3d_fullres_ape_liver_ape", "3d_fullres_ape")
    (preprocessed / "splits_final.json").write_text(json.dumps([{"train": ["A", "phantom001", "phantom002"], "val": ["B"]}]))
    return env, root


def _results(root: Path, trainer: str, configuration: str) -> Path:
    return root / "nnUNet_results" / DATASET / f"{trainer}__nnUNetPlans__{configuration}" / "fold_0"


def _check_full_geometry_validation(root: Path, run: Path, case: str = "B") -> np.ndarray:
    """The validation prediction overlays the source CT exactly; returns it (z, y, x)."""
    prediction = sitk.ReadImage(str(run / "validation" / f"{case}.nii.gz"))
    source = sitk.ReadImage(str(root / "nnUNet_raw" / DATASET / "imagesTr" / f"{case}_0000.nii.gz"))
    assert prediction.GetSize() == source.GetSize()
    assert np.allclose(prediction.GetOrigin(), source.GetOrigin()) and np.allclose(prediction.GetSpacing(), source.GetSpacing())
    assert np.allclose(prediction.GetDirection(), source.GetDirection())
    return sitk.GetArrayFromImage(prediction)


def test_crop_trainer_validates_on_full_images_and_stock_predict_stops(planned):
    from batchgenerators.utilities.file_and_folder_operations import load_pickle

    env, root = planned
    trainer = "nnUNetTrainerAPECrop_smoke"
    out = _run(env, "nnUNetv2_train", "501", "3d_fullres_ape_liver", "0", "-tr", trainer, "-device", "cpu").stdout
    assert "Using trainer 'nnUNetTrainerAPECrop_smoke' from:" in out and "on the full images" in out
    run = _results(root, trainer, "3d_fullres_ape_liver")
    assert (run / "checkpoint_final.pth").is_file()
    summary = json.loads((run / "validation" / "summary.json").read_text())
    assert list(summary["mean"]) == ["1"]  # the chosen organ (liver), scored against the full ground truth
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "nnUNet_preprocessed" / DATASET / "gt_segmentations" / "B.nii.gz")))
    assert summary["mean"]["1"]["n_ref"] == np.count_nonzero(gt == 1)  # the whole liver, not the crop's part
    assert (run / "validation" / "summary_all_labels.json").is_file()

    # validation used the localizer's box (not the label-grown training box): nothing is predicted outside it
    prediction = _check_full_geometry_validation(root, run)
    props = load_pickle(str(root / "nnUNet_preprocessed" / DATASET / "nnUNetPlans_3d_fullres_ape_liver" / "B.pkl"))
    predicted = np.asarray(props["nnunet_ape"]["predicted_box_voxels"])
    trained = np.asarray(props["nnunet_ape"]["box_voxels"])
    assert (np.prod(predicted[1] - predicted[0]) < np.prod(trained[1] - trained[0]))  # the training box grew
    import blosc2

    from nnunet_ape.nnunet.validation_boxes import predicted_box_in_preprocessed

    data = blosc2.open(str(root / "nnUNet_preprocessed" / DATASET / "nnUNetPlans_3d_fullres_ape_liver" / "B.b2nd"), mode="r")
    cut, _ = predicted_box_in_preprocessed(props, data.shape[1:])
    log = next(run.glob("training_log_*.txt")).read_text()
    assert f"B, shape torch.Size([1, {', '.join(str(c.stop - c.start) for c in cut)}])" in log
    outside = np.ones(prediction.shape, bool)
    outside[tuple(slice(max(0, a - 1), b + 1) for a, b in zip(predicted[0][::-1], predicted[1][::-1]))] = False
    assert not prediction[outside].any()

    # stock nnUNetv2_predict cannot make the crops: one line naming nnunet-ape predict, no output
    images = root / "nnUNet_raw" / DATASET / "imagesTs"
    done = _run(env, "nnUNetv2_predict", "-i", str(images), "-o", str(root / "stock_pred"), "-d", "501", "-c",
                "3d_fullres_ape_liver", "-f", "0", "-tr", trainer, "-device", "cpu", expect_ok=False)
    assert done.returncode != 0
    assert "nnunet-ape predict" in done.stderr.strip().splitlines()[-1] and "Traceback" not in done.stderr
    assert not list((root / "stock_pred").glob("*.nii.gz"))


def test_crop_channels_trainer_loads_one_channel_weights(planned, tmp_path):
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    env, root = planned
    plans = json.loads((root / "nnUNet_preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    arch = plans["configurations"]["3d_fullres_ape_liver_ape"]["architecture"]
    one_channel = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 3,
                                         deep_supervision=True)
    torch.save({"network_weights": one_channel.state_dict()}, tmp_path / "ct_only.pth")

    trainer = "nnUNetTrainerAPECropChannels_smoke"
    done = _run(env, "nnUNetv2_train", "501", "3d_fullres_ape_liver_ape", "0", "-tr", trainer, "-device", "cpu",
                "-pretrained_weights", str(tmp_path / "ct_only.pth"))
    assert "input weight(s) widened with zero weights" in done.stdout and "encoder.stages.0.0.convs.0.conv.weight" in done.stdout
    run = _results(root, trainer, "3d_fullres_ape_liver_ape")
    assert json.loads((run / "validation" / "summary.json").read_text())["mean"].keys() == {"1"}
    _check_full_geometry_validation(root, run)
    results_json = json.loads((run.parent / "dataset.json").read_text())
    assert len(results_json["channel_names"]) == 4  # CT + APE x, y, z: what nnU-Net counts the inputs from
    checkpoint = torch.load(run / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    first = checkpoint["network_weights"]["encoder.stages.0.0.convs.0.conv.weight"]
    assert first.shape[1] == 4


@pytest.mark.slow
def test_channels_trainer_on_whole_images(planned):
    env, root = planned
    _run(env, "nnunet-ape", "preprocess", "-d", "501", "-c", "3d_fullres_ape", "-np", "2", "--device", "cpu")
    trainer = "nnUNetTrainerAPEChannels_smoke"
    _run(env, "nnUNetv2_train", "501", "3d_fullres_ape", "0", "-tr", trainer, "-device", "cpu")
    run = _results(root, trainer, "3d_fullres_ape")
    summary = json.loads((run / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2"}  # whole images: every label
    _check_full_geometry_validation(root, run)


def test_trainers_pickle_by_reference_after_ext_lookup(planned):
    """nnU-Net imports trainers/ modules and drops them from sys.modules; the class it finds must still pickle by
    reference (spawned workers re-import it from the installed package)."""
    env, _ = planned
    code = ("import pickle, os; from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
            "c = f('nnUNetTrainerAPECropChannels_smoke'); s = pickle.dumps(c); print(c.__module__, pickle.loads(s) is c)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "nnunet_ape.nnunet.trainers True"
