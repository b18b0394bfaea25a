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

from conftest import announced
from nnunet_datasets import ORGANS, run_tool, tiny_plans, write_raw_dataset

REPO = Path(__file__).resolve().parents[1]
DATASET = "Dataset501_Abd"


def _run(env: dict, *args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    return run_tool(env, "trainers", *args, expect_ok=expect_ok)


@pytest.fixture(scope="module")
def planned(pretrained_run, tmp_path_factory):
    """A raw dataset planned by nnU-Net, with APE configurations added and preprocessed; returns (env, root)."""
    with announced("nnU-Net fingerprint and plans, nnunet-ape plan and preprocess of patients A, B and 3 phantoms"):
        return _planned(pretrained_run, tmp_path_factory)


def _planned(pretrained_run, tmp_path_factory):
    from nnunet_ape.cases import cases_from_nnunet
    from nnunet_ape.localize.fit import fit_localizer
    from nnunet_ape.localize.localizer import save_localizer

    root = tmp_path_factory.mktemp("ape_trainers")
    roots = {k: root / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for p in roots.values():
        p.mkdir()
    env = {**os.environ, **{k: str(v) for k, v in roots.items()}, "nnUNet_extTrainer": str(REPO / "trainers"),
           "nnUNet_def_n_proc": "2", "nnUNet_n_proc_DA": "2", "OMP_NUM_THREADS": "2"}
    source = write_raw_dataset(roots["nnUNet_raw"] / DATASET, phantom_seeds=(1, 2), test_phantoms=(3,))
    shots = [c for c in cases_from_nnunet(str(source)) if c.name in ("A", "B")]
    fitted = fit_localizer(shots, {o: i for i, o in enumerate(ORGANS, 1)}, pretrained_run / "checkpoint_final.pt", method="ape",
                           enlargement="alpha")  # alpha 1 below: tight boxes
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


@pytest.fixture(scope="module")
def crop_run(planned):
    """nnUNetTrainerAPECrop_smoke trained on 3d_fullres_ape_liver (fold 0); returns (training output, results folder)."""
    env, root = planned
    with announced("nnUNetv2_train with nnUNetTrainerAPECrop_smoke on the liver crops"):
        out = _run(env, "nnUNetv2_train", "501", "3d_fullres_ape_liver", "0", "-tr", "nnUNetTrainerAPECrop_smoke", "-device", "cpu").stdout
    return out, _results(root, "nnUNetTrainerAPECrop_smoke", "3d_fullres_ape_liver")


def test_crop_trainer_validates_on_full_images_and_stock_predict_stops(planned, crop_run):
    from batchgenerators.utilities.file_and_folder_operations import load_pickle

    env, root = planned
    trainer = "nnUNetTrainerAPECrop_smoke"
    out, run = crop_run
    assert "Using trainer 'nnUNetTrainerAPECrop_smoke' from:" in out and "on the full images" in out
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
    # the cut is whole preprocessed voxels (2.35 source voxels in-plane for B), so it reaches up to one preprocessed
    # voxel beyond the localizer box; nothing is predicted outside the cut mapped back onto the source grid
    crop = props["shape_after_cropping_and_before_resampling"]
    inside = []
    for axis, (c, (low, _)) in enumerate(zip(cut, props["bbox_used_for_cropping"])):
        factor = crop[axis] / data.shape[1 + axis]
        inside.append(slice(int(np.floor(low + c.start * factor)), int(np.ceil(low + c.stop * factor))))
        box_low, box_high = predicted[0][2 - axis], predicted[1][2 - axis]  # predicted box is x, y, z; arrays z, y, x
        assert box_low - factor - 1 <= inside[-1].start <= box_low and box_high <= inside[-1].stop <= box_high + factor + 1
    outside = np.ones(prediction.shape, bool)
    outside[tuple(inside)] = False
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


def _constant_logits(state: dict, logits: list[float]) -> dict:
    """Network weights whose output is ``logits`` at every voxel (segmentation heads: zero weights, these biases)."""
    import torch

    out = dict(state)
    for key, value in state.items():
        if ".seg_layers." in key:
            out[key] = torch.zeros_like(value) if key.endswith("weight") else torch.tensor(logits, dtype=value.dtype)
    return out


def _crafted_fold(run: Path, fold: str, logits: list[float]) -> None:
    """A fold of the trained crop model whose network predicts ``logits`` everywhere (a model that is sure of itself)."""
    import torch

    checkpoint = torch.load(run / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    checkpoint["network_weights"] = _constant_logits(checkpoint["network_weights"], logits)
    (run.parent / f"fold_{fold}").mkdir(exist_ok=True)
    torch.save(checkpoint, run.parent / f"fold_{fold}" / "checkpoint_final.pth")


def _channels_model(root: Path, logits: list[float]) -> Path:
    """A results folder of the 3d_fullres_ape configuration (whole images + APE channels), as nnUNetv2_train with
    nnUNetTrainerAPEChannels writes it, whose network predicts ``logits`` everywhere."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnunet_ape.nnunet.ape_plans import resolved_configuration, settings_of
    from nnunet_ape.nnunet.trainers import with_added_channels

    plans = json.loads((root / "nnUNet_preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    configuration = resolved_configuration(plans, "3d_fullres_ape")
    folder = root / "nnUNet_results" / DATASET / "nnUNetTrainerAPEChannels__nnUNetPlans__3d_fullres_ape"
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    dataset_json = with_added_channels(json.loads((root / "nnUNet_raw" / DATASET / "dataset.json").read_text()), settings_of(configuration))
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    arch = configuration["architecture"]
    network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 4, 3, deep_supervision=False)
    torch.save({"network_weights": _constant_logits(network.state_dict(), logits), "trainer_name": "nnUNetTrainerAPEChannels",
                "init_args": {"configuration": "3d_fullres_ape"}, "inference_allowed_mirroring_axes": None},
               folder / "fold_0" / "checkpoint_final.pth")
    return folder


@pytest.mark.slow  # 53 s on 2026-12-07 evening
def test_predict_regrows_cut_organs_merges_by_probability_and_runs_one_ape_pass(planned, crop_run, monkeypatch, tmp_path):
    from nnunet_ape import case_features as features_module
    from nnunet_ape.io import read_volume
    from nnunet_ape.nnunet.localized_predict import LocalizedPredictor, PredictOptions, write_case
    from nnunet_ape.nnunet.trained_model import PredictorOptions, open_model

    _, root = planned
    _, run = crop_run
    _crafted_fold(run, "1", [0.0, 4.0, 0.0])  # liver everywhere in its crop, probability 0.96
    options = PredictorOptions(use_mirroring=False, device="cpu")
    ct = read_volume(root / "nnUNet_raw" / DATASET / "imagesTr" / "B_0000.nii.gz")
    liver = open_model(run.parent, ["1"], "checkpoint_final.pth", options)
    assert liver.kind == "crop" and liver.organs == ["liver"] and liver.to_output == {1: 1}

    # a crop whose organ touches its faces grows there and is predicted again (here: once); nothing stays cut silently
    result = LocalizedPredictor([liver], "cpu", PredictOptions(max_regrow=1)).predict_case([ct])
    entry = result.report["models"][0]
    first, final = (np.asarray(a["box_voxels"]) for a in entry["attempts"])
    assert entry["regrown"] == 1 and (final[0] <= first[0]).all() and (final[1] >= first[1]).all() and (final != first).any()
    inside_faces = [f"{'xyz'[a]}-{side}" for a in range(3) for side, at_border in (("low", final[0][a] == 0), ("high", final[1][a] == ct.shape[a])) if not at_border]
    assert entry["still_touched_faces"] == inside_faces  # liver everywhere: every face inside the image, and said so
    expected = np.zeros(ct.shape, np.uint8)
    expected[tuple(slice(a, b) for a, b in zip(*final))] = 1
    assert np.array_equal(result.labels.array, expected) and result.labels.same_geometry(ct)

    # merged with a whole-image model: a voxel goes to the model that is surer of its label; one APE pass for both
    calls = []
    network = features_module.network_map  # the APE network's pass over the CT (the strided and full maps come from it)
    monkeypatch.setattr(features_module, "network_map", lambda *a, **k: calls.append(1) or network(*a, **k))
    for spleen_logit, liver_wins in ((2.0, True), (6.0, False)):  # spleen probability 0.79 / 0.995 against liver's 0.96
        spleen = open_model(_channels_model(root, [0.0, 0.0, spleen_logit]), None, "checkpoint_final.pth", options)
        assert spleen.kind == "channels" and spleen.to_output == {1: 1, 2: 2}
        calls.clear()
        merged = LocalizedPredictor([liver, spleen], "cpu", PredictOptions(max_regrow=0, save_probabilities=True)).predict_case([ct])
        assert len(calls) == 1
        write_case(merged, tmp_path, "B", ".nii.gz", [])
        with np.load(tmp_path / "B.npz") as saved:
            assert saved["labels"].tolist() == [0, 1, 2] and saved["probabilities"].shape == (3, *ct.shape[::-1])
            assert np.allclose(saved["probabilities"][2], np.exp(spleen_logit) / (2 + np.exp(spleen_logit)), atol=2e-3)
        box = np.asarray(merged.report["models"][0]["box_voxels"])
        crop = tuple(slice(a, b) for a, b in zip(*box))
        outside = np.ones(ct.shape, bool)
        outside[crop] = False
        assert (merged.labels.array[crop] == (1 if liver_wins else 2)).all() and (merged.labels.array[outside] == 2).all()


@pytest.mark.slow  # 59 s on 2026-12-07; the kill harness keeps predict's resume and parts in the default run
def test_predict_command_writes_full_geometry_splits_parts_and_resumes(planned, crop_run, tmp_path):
    env, root = planned
    _, run = crop_run
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("B_0000.nii.gz", "phantom002_0000.nii.gz"):
        (cases / name).symlink_to(root / "nnUNet_raw" / DATASET / "imagesTr" / name)
    out = tmp_path / "seg"
    common = ("nnunet-ape", "predict", "-i", str(cases), "-o", str(out), "-d", "501", "-c", "3d_fullres_ape_liver", "-f", "0", "-device", "cpu",
              "--disable_tta", "--max-regrow", "0")
    done = _run(env, *common, "--num-parts", "2", "--part-id", "1").stdout  # the second of the two cases
    assert "1 case(s) predicted" in done and "part 1 of 2" in done
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["phantom002.nii.gz"]
    first = (out / "phantom002.nii.gz").stat().st_mtime_ns
    done = _run(env, *common).stdout  # all cases: the finished one is kept
    assert "1 case(s) predicted, 1 already done" in done and (out / "phantom002.nii.gz").stat().st_mtime_ns == first
    source = sitk.ReadImage(str(cases / "B_0000.nii.gz"))
    predicted = sitk.ReadImage(str(out / "B.nii.gz"))
    assert predicted.GetSize() == source.GetSize() and np.allclose(predicted.GetOrigin(), source.GetOrigin())
    assert np.allclose(predicted.GetDirection(), source.GetDirection()) and np.allclose(predicted.GetSpacing(), source.GetSpacing())
    assert set(np.unique(sitk.GetArrayFromImage(predicted))) <= {0, 1}  # the model's organ only, source label value
    report = json.loads((out / "B_boxes.json").read_text())
    assert report["models"][0]["kind"] == "crop" and report["models"][0]["localizer"]["liver"]["placed"]
    assert json.loads((out / "dataset.json").read_text())["labels"] == {"background": 0, "liver": 1}

    # -l: the same model localized by another localizer (here the planned one with a larger enlargement)
    wider = json.loads((root / "localizer.json").read_text())
    wider["organs"]["liver"]["alpha"] = 2.0
    (tmp_path / "wider.json").write_text(json.dumps(wider))
    other = tmp_path / "seg_wider"
    _run(env, "nnunet-ape", "predict", "-i", str(cases / "B_0000.nii.gz"), "-o", str(other), "-d", "501", "-c",
         "3d_fullres_ape_liver", "-f", "0", "-device", "cpu", "--disable_tta", "--max-regrow", "0", "-l", str(tmp_path / "wider.json"))
    planned_box = np.array(report["models"][0]["localizer"]["liver"]["crop_box_voxels"])
    wider_box = np.array(json.loads((other / "B_boxes.json").read_text())["models"][0]["localizer"]["liver"]["crop_box_voxels"])
    assert np.prod(np.diff(wider_box, axis=0)) > 2 * np.prod(np.diff(planned_box, axis=0))
    missing = _run(env, "nnunet-ape", "predict", "-i", str(cases), "-o", str(tmp_path / "none"), "-d", "501", "-c",
                   "3d_fullres_ape_liver", "-l", str(tmp_path / "nothing.json"), expect_ok=False)
    assert missing.returncode == 2 and "no such localizer" in missing.stderr and not (tmp_path / "none").exists()

    bad = _run(env, "nnunet-ape", "predict", "-i", str(cases), "-o", str(tmp_path / "none"), "-d", "501", "-c", "3d_fullres",
               expect_ok=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "-tr" in bad.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "none").exists()


@pytest.mark.slow  # 38 s on 2026-12-07 evening
def test_predict_with_a_stock_model_is_nnunet_prediction_and_unplaced_organs_fall_back(planned, crop_run, monkeypatch):
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnunet_ape.io import read_volume
    from nnunet_ape.nnunet import localized_predict
    from nnunet_ape.nnunet.localized_predict import LocalizedPredictor, PredictOptions
    from nnunet_ape.nnunet.trained_model import PredictorOptions, open_model

    _, root = planned
    _, run = crop_run
    ct = read_volume(root / "nnUNet_raw" / DATASET / "imagesTr" / "B_0000.nii.gz")
    options = PredictorOptions(use_mirroring=False, device="cpu")

    # a stock 3d_fullres model (random weights: a non-trivial output): predict gives exactly nnU-Net's own prediction
    plans = json.loads((root / "nnUNet_preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    folder = root / "nnUNet_results" / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text((root / "nnUNet_raw" / DATASET / "dataset.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(0)
    network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 3, deep_supervision=False)
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer", "init_args": {"configuration": "3d_fullres"},
                "inference_allowed_mirroring_axes": None}, folder / "fold_0" / "checkpoint_final.pth")
    stock = open_model(folder, None, "checkpoint_final.pth", options)
    assert stock.kind == "full" and stock.feature_args is None
    ours = LocalizedPredictor([stock], "cpu").predict_case([ct])
    theirs = stock.predictor.predict_single_npy_array(ct.array.transpose(2, 1, 0)[None].astype(np.float32),
                                                      {"spacing": list(ct.spacing[::-1])})
    assert np.array_equal(ours.labels.array, theirs.transpose(2, 1, 0)) and len(np.unique(theirs)) > 1

    # an organ the localizer cannot place: a warning, and empty, or with --fallback-full the whole image
    liver = open_model(run.parent, ["0"], "checkpoint_final.pth", options)
    real = localized_predict.case_features

    def unplaced(*args, **kwargs):
        features = real(*args, **kwargs)
        features.boxes["liver"]["placed"] = False
        return features

    monkeypatch.setattr(localized_predict, "case_features", unplaced)
    empty = LocalizedPredictor([liver], "cpu").predict_case([ct])
    assert empty.report["models"][0]["skipped"] == "no organ placed" and not empty.labels.array.any()
    whole = LocalizedPredictor([liver], "cpu", PredictOptions(fallback_full=True)).predict_case([ct])
    entry = whole.report["models"][0]
    assert entry["fallback"] == "whole image" and entry["box_voxels"] == [[0, 0, 0], list(ct.shape)]
