"""The whole crop-dataset path with stock nnU-Net on CPU: raw dataset (patients A, B, phantoms) -> crop-dataset ->
nnUNetv2_plan_and_preprocess --verify_dataset_integrity -> a few iterations of nnUNetv2_train (a short trainer
subclass, tiny plans) -> nnUNetv2_predict -> uncrop: label maps on the source grids with the source label values."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from nnunet_datasets import ORGANS, run_tool, tiny_plans, write_raw_dataset
from nnunet_ape.io import read_volume

TRAINER = '''
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerAPETestTiny(nnUNetTrainer):
    """Four training iterations and one validation iteration, no mirroring: every stage of nnU-Net, quickly."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 4
        self.num_val_iterations_per_epoch = 1

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None  # validation: one pass per tile instead of 8
        return rotation, dummy_2d, initial_patch_size, None
'''


def _nnunet(env: dict, *args: str) -> str:
    return run_tool(env, "end-to-end", *args).stdout


# slow: 2-2.5 minutes. The default run keeps its parts: crop-dataset's output passes nnU-Net's
# verify_dataset_integrity (test_kill_rerun.py), uncrop pastes back (test_crop_dataset.py), stock nnU-Net trains and
# predicts through the trainers' tests (test_nnunet_trainers.py).
@pytest.mark.slow
def test_crop_dataset_trains_predicts_and_pastes_back_with_stock_nnunet(pretrained_run, tmp_path):
    from nnunet_ape.cases import cases_from_nnunet
    from nnunet_ape.localize.fit import fit_localizer
    from nnunet_ape.localize.localizer import save_localizer

    roots = {k: tmp_path / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for p in roots.values():
        p.mkdir()
    ext = tmp_path / "ext_trainers"
    ext.mkdir()
    (ext / "nnunet_ape_test_tiny_trainer.py").write_text(TRAINER)
    env = {**os.environ, **{k: str(v) for k, v in roots.items()}, "nnUNet_extTrainer": str(ext),
           "nnUNet_def_n_proc": "2", "nnUNet_n_proc_DA": "2", "OMP_NUM_THREADS": "2"}
    source = write_raw_dataset(roots["nnUNet_raw"] / "Dataset501_Abd", phantom_seeds=(1, 2), test_phantoms=(3,))
    shots = [c for c in cases_from_nnunet(str(source)) if c.name in ("A", "B")]
    fitted = fit_localizer(shots, {o: i for i, o in enumerate(ORGANS, 1)}, pretrained_run / "checkpoint_final.pt", method="ape",
                           enlargement="alpha")  # alpha 1 below: tight boxes
    for entry in fitted["organs"].values():
        entry["alpha"] = 1.0  # tight boxes: small crops (and training boxes that must grow to hold their labels)
    localizer = save_localizer(fitted, tmp_path / "localizer.json")

    # spleen first: target labels spleen 1, liver 2 are the source's liver 1, spleen 2 swapped
    _nnunet(env, "nnunet-ape", "crop-dataset", "-d", "501", "-l", str(localizer), "--organs", "spleen", "liver", "-o", "601",
            "--channels", "ape", "--device", "cpu")
    crops = roots["nnUNet_raw"] / "Dataset601_AbdSpleenLiverCrop"
    manifest = json.loads((crops / "crops.json").read_text())
    assert manifest["target_to_source_label"] == {"1": 2, "2": 1}

    out = _nnunet(env, "nnUNetv2_plan_and_preprocess", "-d", "601", "-c", "3d_fullres", "--verify_dataset_integrity", "-np", "2")
    assert "verify_dataset_integrity Done" in out
    preprocessed = roots["nnUNet_preprocessed"] / crops.name
    tiny_plans(preprocessed / "nnUNetPlans.json", "3d_fullres")
    (preprocessed / "splits_final.json").write_text(json.dumps([{"train": ["A", "B", "phantom001"], "val": ["phantom002"]}]))
    _nnunet(env, "nnUNetv2_train", "601", "3d_fullres", "0", "-tr", "nnUNetTrainerAPETestTiny", "-device", "cpu")
    run = roots["nnUNet_results"] / crops.name / "nnUNetTrainerAPETestTiny__nnUNetPlans__3d_fullres" / "fold_0"
    assert (run / "checkpoint_final.pth").is_file() and (run / "validation" / "summary.json").is_file()

    pred = tmp_path / "pred601"
    _nnunet(env, "nnUNetv2_predict", "-i", str(crops / "imagesTs"), "-o", str(pred), "-d", "601", "-c", "3d_fullres", "-f", "0",
            "-tr", "nnUNetTrainerAPETestTiny", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1")
    _nnunet(env, "nnunet-ape", "uncrop", "-i", str(pred), "-o", str(tmp_path / "seg"))

    entry = next(c for c in manifest["cases"] if c["case"] == "phantom003")
    ct = read_volume(entry["source_images"][0])
    seg = read_volume(tmp_path / "seg" / "phantom003.nii.gz")
    assert seg.same_geometry(ct, atol=1e-4)  # overlays the source CT
    predicted = read_volume(pred / "phantom003.nii.gz").array
    box = tuple(slice(a, b) for a, b in zip(*entry["box_voxels"]))
    assert np.array_equal(seg.array[box], np.array([0, 2, 1])[predicted])  # source values
    outside = np.ones(ct.shape, bool)
    outside[box] = False
    assert not seg.array[outside].any()

    # nnunet-ape predict on the source CT, with the crop dataset's model: the localizer comes from crops.json, and
    # without regrowth its result is exactly what nnUNetv2_predict + uncrop gave (same crop, channels, network)
    localized = tmp_path / "localized"
    out = _nnunet(env, "nnunet-ape", "predict", "-i", str(source / "imagesTs"), "-o", str(localized), "-d", "601", "-c",
                  "3d_fullres", "-device", "cpu", "--disable_tta", "--max-regrow", "0")
    assert "1 case(s) predicted" in out and "(crop+channels)" in out
    ours = read_volume(localized / "phantom003.nii.gz")
    assert ours.same_geometry(ct, atol=1e-4)
    assert np.mean(ours.array == seg.array) > 0.999
    report = json.loads((localized / "phantom003_boxes.json").read_text())
    assert report["models"][0]["box_voxels"] == entry["box_voxels"]
    assert report["models"][0]["kind"] == "crop+channels" and report["labels"] == {"background": 0, "liver": 1, "spleen": 2}
