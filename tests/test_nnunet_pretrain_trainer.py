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


def _tiny_plans(architecture: str, patch: list[int]) -> dict:
    """Plans of one configuration ``3d_fullres`` with a tiny ``PlainConvUNet`` or ``ResidualEncoderUNet``."""
    kwargs = {"n_stages": 3, "features_per_stage": [4, 8, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
              "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage_decoder": [1, 1],
              "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
              "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
              "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    kwargs["n_blocks_per_stage" if architecture == "ResidualEncoderUNet" else "n_conv_per_stage"] = [1, 1, 1]
    module = "residual_unet" if architecture == "ResidualEncoderUNet" else "unet"
    configuration = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
                     "batch_size": 2, "patch_size": patch, "spacing": [2.0, 1.5, 1.5][: len(patch)],
                     "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
                     "architecture": {"network_class_name": f"dynamic_network_architectures.architectures.{module}.{architecture}",
                                      "arch_kwargs": kwargs, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}
    return {"dataset_name": "Dataset501_Abd", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
            "configurations": {"3d_fullres": configuration}}


def _views(seed: int, inside: bool = True) -> dict:
    """A batch of one view pair ``{"data": (2, 1, 16, 16, 16), "target": (2, 4, 16, 16, 16)}`` of a 32^3 case, the
    second view shifted by (3, 2, 0) voxels (as ViewPairDataLoader makes them); ``inside`` False: both in padding."""
    from nnunet_ape.nnunet.view_pairs import position_channels

    generator = torch.Generator().manual_seed(seed)
    boxes = [[[0, 16]] * 3, [[3, 19], [2, 18], [0, 16]]]
    target = torch.stack([position_channels(box, (32, 32, 32), np.array([2.0, 1.5, 1.5]), 0, (0, 32)) for box in boxes])
    if not inside:
        target[:, 3] = 0
    return {"data": torch.randn(2, 1, 16, 16, 16, generator=generator), "target": target, "keys": [f"case{seed}"] * 2}


def _bare_trainer(network, batches, log: list):
    """An ``nnUNetTrainerAPEPretrain`` around ``network`` with nnU-Net's optimizer, CPU, no AMP, what ``train_step``
    uses and nothing else (nnU-Net's DDP trainer wants CUDA devices)."""
    from nnunet_ape.nnunet.pretrain_trainer import nnUNetTrainerAPEPretrain

    trainer = nnUNetTrainerAPEPretrain.__new__(nnUNetTrainerAPEPretrain)
    trainer.network, trainer.device, trainer.grad_scaler, trainer.points = network, torch.device("cpu"), None, 300
    trainer.optimizer = torch.optim.SGD(network.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    trainer.dataloader_train = trainer.dataloader_val = iter(batches)
    trainer.print_to_log_file = lambda *args, **kwargs: log.append(" ".join(map(str, args)))
    return trainer


def _ddp_worker(rank: int, world: int, port: int, folder: str) -> None:
    """One of ``world`` gloo processes: the output norm alone on this rank's part of a batch, then 3 training steps
    of each architecture as nnU-Net wraps it for DDP (SyncBatchNorm conversion, DDP with its defaults); rank 0's
    second step draws a batch without points inside its scan. Saves what the test compares to ``folder``."""
    import torch.distributed as dist
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nnunet_ape.nnunet.pretrain_trainer import OutputNorm, nnUNetTrainerAPEPretrain

    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {}
        norm = OutputNorm(3)
        x = torch.randn(world * 2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(7)) * 3 + torch.arange(world * 2).view(-1, 1, 1, 1, 1)
        part = x[2 * rank : 2 * rank + 2].clone().requires_grad_(True)
        y = norm(part)
        (y * torch.arange(y.numel()).view_as(y).float().sin()).sum().backward()
        out["norm"] = {"y": y.detach(), "grad": part.grad, "mean": norm.running_mean.clone(), "var": norm.running_var.clone()}
        for architecture in ("PlainConvUNet", "ResidualEncoderUNet"):
            plans = PlansManager(_tiny_plans(architecture, [16, 16, 16]))
            torch.manual_seed(0)
            network = nnUNetTrainerAPEPretrain.build_network_architecture(plans, plans.get_configuration("3d_fullres"), 1, 3, False)
            network = DDP(torch.nn.SyncBatchNorm.convert_sync_batchnorm(network))  # nnUNetTrainer.initialize, on CPU
            log: list[str] = []
            batches = [_views(10 * rank + i, inside=not (rank == 0 and i == 1)) for i in range(4)]
            trainer = _bare_trainer(network, batches, log)
            losses = [float(trainer.train_step(next(trainer.dataloader_train))["loss"]) for _ in range(3)]
            out[architecture] = {"losses": losses, "log": log, "mean": trainer.output_norm.running_mean.clone(),
                                 "var": trainer.output_norm.running_var.clone(),
                                 "weights": {k: v.clone() for k, v in network.module.state_dict().items()}}
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_pretraining_under_ddp_passes_iteration_two_and_syncs_the_output_norm(tmp_path):
    """nnUNetTrainerAPEPretrain's network and train_step under DDP, 2 gloo processes on CPU: past the second
    iteration (the deep-supervision heads it does not compute are frozen), the output norm normalizes with the
    statistics of both processes' batches (as one BatchNorm on the whole batch, gradients included) and both keep the
    same running statistics and weights; a batch without points inside its scan is skipped on one rank alone."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    # the norm alone: each rank's part of one BatchNorm over the whole batch, with its gradient
    x = torch.randn(4, 3, 4, 4, 4, generator=torch.Generator().manual_seed(7)) * 3 + torch.arange(4).view(-1, 1, 1, 1, 1)
    x.requires_grad_(True)
    reference = torch.nn.BatchNorm3d(3, affine=False)
    y = reference(x)
    (y * torch.cat([torch.arange(y[:2].numel()).view_as(y[:2])] * 2).float().sin()).sum().backward()
    for rank, out in enumerate(ranks):
        assert torch.allclose(out["norm"]["y"], y[2 * rank : 2 * rank + 2].detach(), atol=1e-5)
        assert torch.allclose(out["norm"]["grad"], x.grad[2 * rank : 2 * rank + 2], atol=1e-5)
        assert torch.allclose(out["norm"]["mean"], reference.running_mean, atol=1e-6)
        assert torch.allclose(out["norm"]["var"], reference.running_var, atol=1e-5)

    for architecture in ("PlainConvUNet", "ResidualEncoderUNet"):
        first, second = (out[architecture] for out in ranks)
        assert all(np.isfinite(first["losses"] + second["losses"]))
        assert torch.equal(first["mean"], second["mean"]) and torch.equal(first["var"], second["var"])
        assert not torch.allclose(first["mean"], torch.zeros(3))  # the statistics moved
        assert all(torch.allclose(first["weights"][k], second["weights"][k]) for k in first["weights"])
        assert len(first["log"]) == 1 and "without points inside its scan" in first["log"][0] and not second["log"]


def test_pretraining_network_keeps_the_plans_weights_with_its_output_norm_and_frozen_unused_heads():
    """The network nnUNetTrainerAPEPretrain builds: the state dict of the plans' network (so -pretrained_weights and
    embed load it), the deep-supervision heads it never computes frozen, and an output norm that is a non-affine
    BatchNorm3d in one process (training and eval) and follows the network's train()/eval()."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ape.nnunet.pretrain_trainer import OutputNorm, nnUNetTrainerAPEPretrain

    plans = PlansManager(_tiny_plans("PlainConvUNet", [16, 16, 16]))
    configuration = plans.get_configuration("3d_fullres")
    network = nnUNetTrainerAPEPretrain.build_network_architecture(plans, configuration, 1, 3, False)
    stock = get_network_from_plans(configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                                   configuration.network_arch_init_kwargs_req_import, 1, 3, deep_supervision=False)
    assert list(network.state_dict()) == list(stock.state_dict())
    frozen = sorted(k for k, p in network.named_parameters() if not p.requires_grad)
    assert frozen == ["decoder.seg_layers.0.bias", "decoder.seg_layers.0.weight"]  # 2 decoder stages, the last one used
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16, 16)
    out = network(x)
    assert out.shape == (2, 3, 16, 16, 16) and torch.allclose(out.mean((0, 2, 3, 4)), torch.zeros(3), atol=1e-5)
    network.eval()
    stock.load_state_dict(network.state_dict())
    with torch.no_grad():
        norm = network.ape_output_norm
        expected = (stock(x) - norm.running_mean.view(1, 3, 1, 1, 1)) / (norm.running_var.view(1, 3, 1, 1, 1) + 1e-5).sqrt()
        assert torch.allclose(network(x), expected, atol=1e-5)

    trainer = nnUNetTrainerAPEPretrain.__new__(nnUNetTrainerAPEPretrain)
    trainer.is_ddp, trainer.network, trainer.print_to_log_file = True, None, lambda *args, **kwargs: None
    trainer.plot_network_architecture()  # under DDP no forward on the first process alone (the norm would wait)

    ours, reference = OutputNorm(3), torch.nn.BatchNorm3d(3, affine=False)
    for _ in range(3):
        y = torch.randn(4, 3, 5, 6, 7) * 4 + 2
        assert torch.allclose(ours(y), reference(y), atol=1e-5)
    assert torch.allclose(ours.running_mean, reference.running_mean, atol=1e-6)
    assert torch.allclose(ours.running_var, reference.running_var, atol=1e-5)
    ours.eval(), reference.eval()
    assert torch.allclose(ours(y), reference(y), atol=1e-5)


def test_a_batch_without_points_inside_its_scan_is_skipped_and_logged():
    """position_channel_loss has no loss for a batch whose views all lie in padding; the trainer takes the next
    batch instead (training and validation) and logs the skipped one, instead of ending a long run."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ape.nnunet.pretrain_trainer import nnUNetTrainerAPEPretrain

    plans = PlansManager(_tiny_plans("PlainConvUNet", [16, 16, 16]))
    network = nnUNetTrainerAPEPretrain.build_network_architecture(plans, plans.get_configuration("3d_fullres"), 1, 3, False)
    log: list[str] = []
    trainer = _bare_trainer(network, [_views(1), _views(2, inside=False), _views(3)], log)
    assert np.isfinite(trainer.train_step(_views(0, inside=False))["loss"])
    assert len(log) == 1 and "case0 without points inside its scan" in log[0]
    network.eval()
    assert np.isfinite(trainer.validation_step(_views(4, inside=False))["loss"])
    assert len(log) == 3  # the validation batch, then the next one drawn


def test_2d_pretraining_is_refused_with_one_line():
    from nnunet_ape.nnunet.pretrain_trainer import nnUNetTrainerAPEPretrain

    plans = {**_tiny_plans("PlainConvUNet", [64, 64]), "continue_training": False}
    with pytest.raises(SystemExit, match=r"needs a 3d configuration; '3d_fullres' has 2-d patches \[64, 64\]"):
        nnUNetTrainerAPEPretrain(plans, "3d_fullres", 0, {"channel_names": {"0": "CT"}, "labels": {"background": 0}},
                                 torch.device("cpu"))


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


@pytest.mark.slow  # 110 s on 2026-12-07 (seven nnU-Net / nnunet-ape processes); the trainer's own tests stay default
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
    # (one call over a list file: each nnunet-ape start costs seconds of imports)
    cases = tmp_path / "cases.txt"
    cases.write_text(f"{patient('A')}\n{patient('B')}\n")
    run_tool(env, "pretrain-trainer", "nnunet-ape", "embed", "-m", str(run / "checkpoint_final.pth"), "-i", str(cases),
             "-o", str(tmp_path / "maps"), "--device", "cpu")
    for key in ("A", "B"):
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
