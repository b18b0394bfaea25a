"""nnU-Net internals the plugin relies on where nnU-Net has no public hook: each test fails loudly, naming what to
re-check, on an nnU-Net version that changed them (the plugin pins nnunetv2>=2.8,<2.9; these were read from 2.8.1).

- behaviour, driven through nnU-Net's own functions: stock prediction refuses the APE models (the stack check of
  ``trainers._called_by_stock_predictor``), ``-pretrained_weights`` goes through our loader (the replaced
  ``run_training.load_pretrained_weights``), the validation datasets cut what nnU-Net's ``load_case`` returns;
- source: the functions we copy (``get_dataloaders``, ``train_step``, ``on_epoch_end``, ``save_checkpoint`` in the
  pretraining trainer, ``generate_train_batch`` in its view-pair loader), override around (``_normalize``,
  ``perform_actual_validation``, ``load_checkpoint``, DDP wrapping in ``initialize``) or patch, by a hash of their
  source: a changed hash means reading nnU-Net's new version against the file named in the message, then updating
  the hash here.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import json
import pickle

import numpy as np
import pytest
import torch

from test_nnunet_plugin import _tiny_network
from test_nnunet_pretrain_trainer import _tiny_plans

# "module:qualified name" -> (sha256 of inspect.getsource, first 16 hex digits, in nnunetv2 2.8.1; what to re-check)
PINNED = {
    "nnunetv2.training.nnUNetTrainer.nnUNetTrainer:nnUNetTrainer.initialize": (
        "5732dd44ffbbbf74", "pretrain_trainer.py: the network from build_network_architecture is what DDP wraps, with "
                            "its defaults (the output norm inside it, unused heads frozen); trainers.py: install_in_nnunet runs first"),
    "nnunetv2.training.nnUNetTrainer.nnUNetTrainer:nnUNetTrainer.get_dataloaders": (
        "5f59e2b907cfa2d1", "pretrain_trainer.py nnUNetTrainerAPEPretrain.get_dataloaders, a copy with ViewPairDataLoader"),
    "nnunetv2.training.nnUNetTrainer.nnUNetTrainer:nnUNetTrainer.train_step": (
        "c8993de84c8c419f", "pretrain_trainer.py nnUNetTrainerAPEPretrain.train_step, a copy with the APE loss"),
    "nnunetv2.training.nnUNetTrainer.nnUNetTrainer:nnUNetTrainer.on_epoch_end": (
        "988deef2bd79d339", "pretrain_trainer.py nnUNetTrainerAPEPretrain.on_epoch_end, a copy with the APE losses"),
    "nnunetv2.training.nnUNetTrainer.nnUNetTrainer:nnUNetTrainer.save_checkpoint": (
        "de4f196c42e6bcf5", "pretrain_trainer.py nnUNetTrainerAPEPretrain.save_checkpoint, a copy with its keys plus nnunet_ape"),
    "nnunetv2.training.nnUNetTrainer.nnUNetTrainer:nnUNetTrainer.load_checkpoint": (
        # 2.8.1, and GitHub main of 2026-07-13 (0e49508: the parameter is renamed to checkpoint and a dict loads; every
        # caller passes it positionally, as our override does)
        ("a386bed4eafaa4fa", "032ce9cb469406a6"),
        "pretrain_trainer.py nnUNetTrainerAPEPretrain.load_checkpoint (reads the keys save_checkpoint writes)"),
    "nnunetv2.training.nnUNetTrainer.nnUNetTrainer:nnUNetTrainer.perform_actual_validation": (
        "2bd52ada76cd3185", "trainers.py nnUNetTrainerAPE.perform_actual_validation: it swaps self.dataset_class, which this "
                            "must still instantiate and read with load_case"),
    "nnunetv2.training.dataloading.nnunet_dataset:nnUNetDatasetBlosc2.load_case": (
        "78e996392fbc232e", "validation_boxes.py PredictedBoxDatasetBlosc2.load_case (four values: data, seg, seg_prev, properties)"),
    "nnunetv2.training.dataloading.nnunet_dataset:nnUNetDatasetNumpy.load_case": (
        "52f015f1f6e165a2", "validation_boxes.py PredictedBoxDatasetNumpy.load_case (four values: data, seg, seg_prev, properties)"),
    "nnunetv2.training.dataloading.data_loader:nnUNetDataLoader.generate_train_batch": (
        "0a430703c66ec9b8", "view_pairs.py ViewPairDataLoader.generate_train_batch (load_case, get_bbox, crop_and_pad_nd, transforms)"),
    "nnunetv2.preprocessing.preprocessors.default_preprocessor:DefaultPreprocessor._normalize": (
        "4b5d52ba18f072bc", "preprocessor.py SourceChannelsPreprocessor._normalize (private; normalizes a channel view in place)"),
    "nnunetv2.run.run_training:maybe_load_checkpoint": (
        "401db73a3f14697d", "pretrained_weights.py install_in_nnunet (replaces the module global load_pretrained_weights, "
                            "called after trainer.initialize)"),
    "nnunetv2.run.load_pretrained_weights:load_pretrained_weights": (
        "1dc18e4eb8cc4de3", "pretrained_weights.py load_pretrained_weights_adding_channels (same rules, plus widened inputs)"),
    "nnunetv2.inference.predict_from_raw_data:nnUNetPredictor.initialize_from_trained_model_folder": (
        "8b601a28f7175780", "trainers.py _called_by_stock_predictor (stock prediction builds the network only here)"),
}


def _resolve(name: str):
    module, qualified = name.split(":")
    obj = importlib.import_module(module)
    for part in qualified.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("name", sorted(PINNED))
def test_nnunet_functions_we_copy_or_patch_are_unchanged(name):
    expected, what = PINNED[name]
    known = (expected,) if isinstance(expected, str) else expected
    version = importlib.metadata.version("nnunetv2")  # nnunetv2 has no __version__
    try:
        found = hashlib.sha256(inspect.getsource(_resolve(name)).encode()).hexdigest()[:16]
    except (ImportError, AttributeError) as error:
        pytest.fail(f"nnunetv2 {version} has no {name} ({error}); re-check {what}")
    assert found in known, (f"nnunetv2 {version} changed {name} (source hash {found}, read for {' or '.join(known)}); "
                            f"re-check nnunet_ape/nnunet/{what}, then update PINNED in {__name__}")


def _model_folder(folder, trainer_name: str):
    """A trained-model folder as nnU-Net's predictor reads it (no weights: the network build is what is tested)."""
    (folder / "fold_all").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(_tiny_plans("PlainConvUNet", [16, 16, 16])))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                                                     "numTraining": 1, "file_ending": ".nii.gz"}))
    torch.save({"trainer_name": trainer_name, "init_args": {"configuration": "3d_fullres"}, "network_weights": {},
                "inference_allowed_mirroring_axes": None}, folder / "fold_all" / "checkpoint_final.pth")
    return folder


@pytest.mark.parametrize("trainer_name, message", [("nnUNetTrainerAPECrop", "predict with 'nnunet-ape predict'"),
                                                   ("nnUNetTrainerAPEPretrain", "an APE pretraining model")])
def test_stock_prediction_of_an_ape_model_stops_with_one_line(trainer_name, message, tmp_path, monkeypatch):
    """nnU-Net's own nnUNetPredictor.initialize_from_trained_model_folder (nnUNetv2_predict) on an APE model stops
    with our line; our own builds of the same network are not refused."""
    import nnunetv2.inference.predict_from_raw_data as predict_module
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ape.nnunet import pretrain_trainer, trainers

    trainer = getattr(trainers, trainer_name, None) or getattr(pretrain_trainer, trainer_name)
    monkeypatch.setattr(predict_module, "recursive_find_trainer_class_by_name", lambda name: trainer)
    folder = _model_folder(tmp_path / "model", trainer_name)
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    with pytest.raises(SystemExit, match=message):
        predictor.initialize_from_trained_model_folder(str(folder), ("all",))
    plans = PlansManager(_tiny_plans("PlainConvUNet", [16, 16, 16]))
    network = trainer.build_network_architecture(plans, plans.get_configuration("3d_fullres"), 1, 2, False)
    assert isinstance(network, torch.nn.Module)


def test_pretrained_weights_go_through_our_loader_in_nnunets_run_training(tmp_path, monkeypatch):
    """nnU-Net's run_training.maybe_load_checkpoint (nnUNetv2_train -pretrained_weights) after an APE trainer's
    initialize loads a 1-channel checkpoint into a 4-channel network (nnU-Net's own loader would assert)."""
    import nnunetv2.run.run_training as run_training
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_ape.nnunet.trainers import nnUNetTrainerAPEChannels

    monkeypatch.setattr(run_training, "load_pretrained_weights", run_training.load_pretrained_weights)  # restored after
    monkeypatch.setattr(nnUNetTrainer, "initialize", lambda self: setattr(self, "was_initialized", True))
    torch.manual_seed(0)
    ct_model = _tiny_network(1)
    torch.save({"network_weights": ct_model.state_dict()}, tmp_path / "ct.pth")
    trainer = nnUNetTrainerAPEChannels.__new__(nnUNetTrainerAPEChannels)
    trainer.was_initialized, trainer.network = False, _tiny_network(4)
    run_training.maybe_load_checkpoint(trainer, False, False, str(tmp_path / "ct.pth"))
    first = trainer.network.state_dict()["encoder.stages.0.0.convs.0.conv.weight"]
    assert trainer.was_initialized and first.shape[1] == 4
    assert torch.equal(first[:, :1], ct_model.state_dict()["encoder.stages.0.0.convs.0.conv.weight"]) and not first[:, 1:].any()


@pytest.mark.parametrize("kind", ["Blosc2", "Numpy"])
def test_validation_datasets_cut_what_nnunet_loads(kind, tmp_path):
    """nnU-Net's dataset classes save and load a case (four values); our validation subclass of the class nnU-Net
    infers for the folder returns the same four, data and seg cut to the localizer's box."""
    from nnunetv2.training.dataloading import nnunet_dataset
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_ape.nnunet.validation_boxes import predicted_box_dataset_class

    data = np.arange(20 * 16 * 12, dtype=np.float32).reshape(1, 20, 16, 12)
    seg = np.ones((1, 20, 16, 12), dtype=np.int8)
    props = {"nnunet_ape": {"predicted_box_voxels": [[2, 4, 5], [8, 12, 15]], "transpose_forward": [0, 1, 2]},
             "bbox_used_for_cropping": [[0, 20], [0, 16], [0, 12]], "shape_after_cropping_and_before_resampling": (20, 16, 12),
             "shape_before_cropping": (20, 16, 12), "spacing": [1.0, 1.0, 1.0]}
    saver = getattr(nnunet_dataset, f"nnUNetDataset{kind}")
    extra = {"chunks": (1, 20, 16, 12), "blocks": (1, 10, 8, 6)} if kind == "Blosc2" else {}
    saver.save_case(data, seg, props, str(tmp_path / "case1"), **extra)
    found = infer_dataset_class(str(tmp_path))
    assert found is saver
    cls = predicted_box_dataset_class(found)
    assert issubclass(cls, saver)
    loaded = cls(str(tmp_path), ["case1"]).load_case("case1")
    assert len(loaded) == 4
    cut, cut_seg, seg_prev, properties = loaded
    assert cut.shape == cut_seg.shape == (1, 10, 8, 6) and seg_prev is None
    assert np.array_equal(np.asarray(cut), data[:, 5:15, 4:12, 2:8])
    assert properties["bbox_used_for_cropping"] == [[5, 15], [4, 12], [2, 8]]
    pickle.dumps(cls)  # nnU-Net's export workers get it by reference
