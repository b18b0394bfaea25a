"""APE pretraining inside nnU-Net, and nnU-Net initialised from it: raw dataset (patients A, B, phantoms) ->
nnUNetv2_plan_and_preprocess (tiny plans) -> nnUNetv2_train -tr nnUNetTrainerAPEPretrain... (one epoch, then one
more with --c) -> nnUNetv2_train -pretrained_weights into a stock segmentation trainer -> nnunet-ape embed with the
same checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import announced, patient
from nnunet_datasets import run_tool, tiny_plans, write_raw_dataset

DATASET = "Dataset501_Abd"
TRAINERS = '''
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ape.nnunet.pretrain_trainer import nnUNetTrainerAPEPretrain


class nnUNetTrainerAPEPretrainTest(nnUNetTrainerAPEPretrain):
    """TEST_EPOCHS epochs of 10 iterations."""

    points = 2000

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("TEST_EPOCHS", "1"))
        self.num_iterations_per_epoch = 10
        self.num_val_iterations_per_epoch = 3


class nnUNetTrainerStartWeights(nnUNetTrainer):
    """One iteration of stock segmentation training; saves the network's weights as training starts (nnU-Net loads
    -pretrained_weights before that)."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 1
        self.num_val_iterations_per_epoch = 1

    def on_train_start(self):
        super().on_train_start()
        torch.save(self.network.state_dict(), os.path.join(self.output_folder, "start_weights.pt"))

    def perform_actual_validation(self, save_probabilities=False):
        pass
'''

# run in a subprocess: nnU-Net reads its folders from the environment when first imported
PAIRS_CHECK = '''
import json, os, sys
import numpy as np, torch
from nnunet_ape.nnunet.pretrain_trainer import nnUNetTrainerAPEPretrain
from nnunet_ape.pretrain.loss import sample_embeddings
from nnunet_ape.pretrain.position_channels import matched_points

folder = sys.argv[1]
plans = json.load(open(os.path.join(folder, "nnUNetPlans.json")))
plans["continue_training"] = False
trainer = nnUNetTrainerAPEPretrain(plans, "3d_fullres", "all", json.load(open(os.path.join(folder, "dataset.json"))),
                                   torch.device("cpu"))
trainer.initialize()
train, val = trainer.get_dataloaders()
out = {}
for name, generator in (("val", val), ("train", train)):
    rows = []
    for _ in range(4):
        batch = next(generator)
        assert batch["data"].shape[0] % 2 == 0 and batch["target"].shape[1] == 4 and len(set(batch["keys"])) == 1
        for pair, first, second, positions in matched_points(batch["target"], 1000):
            a = sample_embeddings(batch["data"][2 * pair : 2 * pair + 1], first[None])[0, :, 0]
            b = sample_embeddings(batch["data"][2 * pair + 1 : 2 * pair + 2], second[None])[0, :, 0]
            if a.std() > 0.05 and b.std() > 0.05:
                rows.append([float(np.corrcoef(a, b)[0, 1]), float((a - b).abs().max()), len(first)])
    out[name] = rows
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """(env, preprocessed folder, results folder) of a raw dataset planned and preprocessed by nnU-Net, tiny plans."""
    with announced("nnU-Net plans and preprocessing of patients A, B and 2 phantoms for APE pretraining"):
        root = tmp_path_factory.mktemp("ape_pretrain")
        roots = {k: root / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
        for p in roots.values():
            p.mkdir()
        ext = root / "ext_trainers"
        ext.mkdir()
        (ext / "nnunet_ape_pretrain_test_trainers.py").write_text(TRAINERS)
        env = {**os.environ, **{k: str(v) for k, v in roots.items()}, "nnUNet_extTrainer": str(ext),
               "nnUNet_def_n_proc": "2", "nnUNet_n_proc_DA": "2", "OMP_NUM_THREADS": "2"}
        write_raw_dataset(roots["nnUNet_raw"] / DATASET, phantom_seeds=(1, 2))
        run_tool(env, "pretrain-trainer", "nnUNetv2_plan_and_preprocess", "-d", "501", "-c", "3d_fullres", "-np", "2")
        preprocessed = roots["nnUNet_preprocessed"] / DATASET
        tiny_plans(preprocessed / "nnUNetPlans.json", "3d_fullres")
        (preprocessed / "splits_final.json").write_text(json.dumps([{"train": ["A", "B", "phantom001"], "val": ["phantom002"]}]))
        return env, preprocessed, roots["nnUNet_results"] / DATASET


def test_view_pairs_share_their_points(planned):
    """The positive pairs found through the position channels are the same voxels: equal CT values in both views
    without augmentation, nearly equal after nnU-Net's rotation, scaling and intensity augmentations."""
    env, preprocessed, _ = planned
    done = subprocess.run([sys.executable, "-c", PAIRS_CHECK, str(preprocessed)], env={**env, "nnUNet_n_proc_DA": "0"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["val"] and found["train"]
    assert all(diff < 1e-4 for _, diff, _ in found["val"])  # no augmentation: identical values at matched points
    assert np.median([corr for corr, _, _ in found["train"]]) > 0.9
    assert all(n >= 8 for _, _, n in found["train"] + found["val"])


def test_pretrain_resume_finetune_and_embed(planned, tmp_path):
    env, _, results = planned
    run = results / "nnUNetTrainerAPEPretrainTest__nnUNetPlans__3d_fullres" / "fold_all"
    train = ("nnUNetv2_train", "501", "3d_fullres", "all", "-tr", "nnUNetTrainerAPEPretrainTest", "-device", "cpu")
    run_tool({**env, "TEST_EPOCHS": "1"}, "pretrain-trainer", *train)
    first = torch.load(run / "checkpoint_final.pth", weights_only=False)
    assert first["current_epoch"] == 1 and first["nnunet_ape"]["format"] == "nnunet-ape/ape-nnunet-v1"

    # --c: nnU-Net resumes from the final checkpoint and trains the second epoch only
    out = run_tool({**env, "TEST_EPOCHS": "2"}, "pretrain-trainer", *train, "--c").stdout
    assert out.count("APE train_loss") == 1
    checkpoint = torch.load(run / "checkpoint_final.pth", weights_only=False)
    assert checkpoint["current_epoch"] == 2 and len(checkpoint["logging"]["train_losses"]) == 2
    assert checkpoint["logging"]["train_losses"][0] == pytest.approx(first["logging"]["train_losses"][0])
    assert (run / "progress.png").stat().st_size > 10_000
    ape = checkpoint["nnunet_ape"]
    assert sorted(a for a, _ in ape["patient_axes"]) == [0, 1, 2]
    assert not torch.allclose(ape["output_var"], torch.ones(3))  # the output norm's statistics were learned
    # the network is the plans' own with a 3-channel head
    weights = checkpoint["network_weights"]
    heads = [k for k in weights if ".seg_layers." in k and k.endswith("weight")]
    assert heads and all(weights[k].shape[0] == 3 for k in heads)

    # -pretrained_weights into stock nnU-Net segmentation: every weight but the segmentation heads is the pretrained one
    run_tool(env, "pretrain-trainer", "nnUNetv2_train", "501", "3d_fullres", "0", "-tr", "nnUNetTrainerStartWeights",
             "-device", "cpu", "-pretrained_weights", str(run / "checkpoint_final.pth"))
    start = torch.load(results / "nnUNetTrainerStartWeights__nnUNetPlans__3d_fullres" / "fold_0" / "start_weights.pt")
    body = [k for k in start if ".seg_layers." not in k]
    assert len(body) > 10 and set(body) <= set(weights)
    assert all(torch.equal(start[k].cpu(), weights[k].cpu()) for k in body)
    assert not all(torch.equal(start[k].cpu(), weights[k].cpu()) for k in start if ".seg_layers." in k)

    # the same checkpoint is an APE model for embed: a 3-channel map on the input's grid, for both orientations
    for key in ("A", "B"):
        out = run_tool(env, "pretrain-trainer", "nnunet-ape", "embed", "-m", str(run / "checkpoint_final.pth"), "-i",
                       str(patient(key)), "-o", str(tmp_path / "maps"), "--device", "cpu")
        ct = sitk.ReadImage(str(patient(key)))
        image = sitk.ReadImage(str(next((tmp_path / "maps").glob(f"{patient(key).name.split('.')[0]}*_ape.nii.gz"))))
        assert image.GetSize() == ct.GetSize() and image.GetNumberOfComponentsPerPixel() == 3
        assert np.allclose(image.GetSpacing(), ct.GetSpacing()) and np.allclose(image.GetOrigin(), ct.GetOrigin())
        assert np.allclose(image.GetDirection(), ct.GetDirection())
        maps = sitk.GetArrayFromImage(image)
        assert np.isfinite(maps).all() and maps.reshape(-1, 3).std(0).min() > 0.01

    # ... and for localize: fit on the dataset's labeled cases, boxes for a CT
    localizer = tmp_path / "liver.json"
    run_tool(env, "pretrain-trainer", "nnunet-ape", "localize", "fit", "-m", str(run / "checkpoint_final.pth"), "-d", "501",
             "--organs", "liver", "--shots", "3", "-o", str(localizer), "--device", "cpu")
    run_tool(env, "pretrain-trainer", "nnunet-ape", "localize", "predict", "-l", str(localizer), "-i", str(patient("B")),
             "-o", str(tmp_path / "boxes"), "--device", "cpu")
    boxes = json.loads(next((tmp_path / "boxes").glob("*_boxes.json")).read_text())
    assert "liver" in json.dumps(boxes)

    # stock nnUNetv2_predict refuses the pretraining model with one line
    done = run_tool(env, "pretrain-trainer", "nnUNetv2_predict", "-i", str(tmp_path / "maps"), "-o", str(tmp_path / "pred"),
                    "-d", "501", "-c", "3d_fullres", "-f", "all", "-tr", "nnUNetTrainerAPEPretrainTest", "-device", "cpu",
                    expect_ok=False)
    assert done.returncode != 0 and "APE pretraining model" in done.stderr + done.stdout
