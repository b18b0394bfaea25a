"""The pieces of the APE trainers and preprocessors, in process and fast: channel-only intensity augmentation,
honest validation boxes, pretrained weights with added channels, plans editing, organ-only summaries, CLI errors."""

from __future__ import annotations

import json
import multiprocessing
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_ape.cli.main import main

PLANS = {
    "dataset_name": "Dataset501_Abd", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
    "configurations": {
        "2d": {"data_identifier": "nnUNetPlans_2d", "patch_size": [128, 128], "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False]},
        "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [96, 128, 128], "spacing": [2.5, 1.5, 1.5],
                       "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False]},
    },
}


def _training_transforms():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    return nnUNetTrainer.get_training_transforms((32, 32, 32), (-0.5, 0.5), None, (0, 1, 2), False)


def _intensity_only(transforms, wrap: bool):
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    from nnunet_ape.nnunet.channel_augmentation import intensity_on_image_channels, is_intensity_transform

    kept = [t for t in transforms.transforms if is_intensity_transform(t)]
    for t in kept:
        if isinstance(t, RandomTransform):
            t.apply_probability = 1.0  # every augmentation, every time
    out = ComposeTransforms(kept)
    return intensity_on_image_channels(out, 1) if wrap else out


def test_intensity_augmentations_touch_the_ct_channel_only():
    torch.manual_seed(0)
    image = torch.stack([torch.randn(32, 32, 32), torch.linspace(-1, 1, 32).expand(32, 32, 32).clone()])
    seg = torch.zeros(1, 32, 32, 32, dtype=torch.int16)
    wrapped = _intensity_only(_training_transforms(), wrap=True)
    assert len(wrapped.transforms) == 7  # noise, blur, brightness, contrast, low resolution, gamma x2
    out = wrapped(image=image.clone(), segmentation=seg.clone())
    assert torch.equal(out["image"][1], image[1])  # the embedding channel passes untouched
    assert not torch.allclose(out["image"][0], image[0])  # the CT channel is augmented
    stock = _intensity_only(_training_transforms(), wrap=False)(image=image.clone(), segmentation=seg.clone())
    assert not torch.allclose(stock["image"][1], image[1])  # what nnU-Net alone would do to it


def _always(transform):
    """``transform`` with every RandomTransform inside it applied every time."""
    from batchgeneratorsv2.transforms.utils.random import OneOfTransform, RandomTransform

    if isinstance(transform, RandomTransform):
        transform.apply_probability = 1.0
        _always(transform.transform)
    for inner in transform.list_of_transforms if isinstance(transform, OneOfTransform) else []:
        _always(inner)
    return transform


def test_other_intensity_augmentations_are_kept_off_the_embedding_channels_and_unknown_ones_refused():
    """nnU-Net's DA5 variant (median filter, sharpening, additive brightness, local gamma, blank rectangles, in
    OneOf groups): every transform of voxel values touches the CT channel only, every spatial one stays; a transform
    of unknown kind stops with one line naming where to classify it."""
    from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import nnUNetTrainerDA5

    from nnunet_ape.nnunet.channel_augmentation import FirstChannelsOnly, intensity_on_image_channels

    torch.manual_seed(0)
    np.random.seed(0)
    stock = nnUNetTrainerDA5.get_training_transforms((32, 32, 32), (-0.5, 0.5), None, (0, 1, 2), False)
    wrapped = intensity_on_image_channels(stock, 1)
    kept = [t for t in wrapped.transforms if not isinstance(t, FirstChannelsOnly)]
    assert any(isinstance(t, SpatialTransform) for t in kept)
    intensity = [t for t in wrapped.transforms if isinstance(t, FirstChannelsOnly) and _always(t.transform)]
    names = repr(intensity)
    assert all(n in names for n in ("MedianFilterTransform", "SharpeningTransform", "BrightnessAdditiveTransform",
                                    "LocalGammaTransform", "BlankRectangleTransform"))
    image = torch.stack([torch.randn(32, 32, 32), torch.linspace(-1, 1, 32).expand(32, 32, 32).clone()])
    for _ in range(3):
        out = ComposeTransforms(intensity)(image=image.clone(), segmentation=torch.zeros(1, 32, 32, 32, dtype=torch.int16))
        assert torch.equal(out["image"][1], image[1]) and not torch.allclose(out["image"][0], image[0])

    class Unknown(BasicTransform):
        def apply(self, data_dict, **params):
            return data_dict

    with pytest.raises(TypeError, match="cannot tell whether augmentation Unknown changes intensities.*channel_augmentation.py"):
        intensity_on_image_channels(ComposeTransforms([Unknown()]), 1)


def test_dataset_channels_trainer_keeps_intensity_augmentation_off_crop_dataset_embeddings():
    """A crop-dataset with --channels ape bpr trained by nnUNetTrainerDatasetChannels: the intensity augmentations
    touch the CT only; a dataset without embedding channels keeps nnU-Net's transforms as they are."""
    from nnunet_ape.nnunet.channel_augmentation import FirstChannelsOnly, is_intensity_transform
    from nnunet_ape.nnunet.trainers import nnUNetTrainerDatasetChannels, source_channel_count

    trainer = nnUNetTrainerDatasetChannels.__new__(nnUNetTrainerDatasetChannels)
    trainer.dataset_json = {"channel_names": {"0": "CT", "1": "noNorm", "2": "noNorm", "3": "noNorm", "4": "noNorm"},
                            "nnunet_ape": {"kind": "crops", "channels": ["CT", "APE_x", "APE_y", "APE_z", "BPR"]}}
    transforms = trainer.get_training_transforms((32, 32, 32), (-0.5, 0.5), None, (0, 1, 2), False).transforms
    wrapped = [t for t in transforms if isinstance(t, FirstChannelsOnly)]
    assert len(wrapped) == 7 and all(t.n == 1 for t in wrapped)
    assert not any(is_intensity_transform(t) for t in transforms if not isinstance(t, FirstChannelsOnly))
    assert source_channel_count({"channel_names": {"0": "CT", "1": "T2"}}) == 2
    trainer.dataset_json = {"channel_names": {"0": "CT"}, "nnunet_ape": {"kind": "crops", "channels": ["CT"]}}
    plain = trainer.get_training_transforms((32, 32, 32), (-0.5, 0.5), None, (0, 1, 2), False).transforms
    assert not any(isinstance(t, FirstChannelsOnly) for t in plain)


def test_boxes_and_channels_refuse_a_first_channel_that_is_not_ct():
    """An MR (values from 0), a normalized image or unrescaled scanner values as channel 0 stops with one line
    before any model runs (the boxes and channels would be garbage); a CT passes."""
    from nnunet_ape.case_features import FeatureModels, case_features
    from nnunet_ape.errors import InputError
    from nnunet_ape.io import Volume

    nothing = FeatureModels(None, [], (), None, None, None, None, "cpu")
    rng = np.random.default_rng(0)
    for image in (rng.uniform(0, 1200, (20, 20, 10)), rng.normal(0, 1, (20, 20, 10)), rng.uniform(0, 4095, (20, 20, 10))):
        with pytest.raises(InputError, match=r"not CT in Hounsfield units .* put the CT first") as error:
            case_features(nothing, Volume(image.astype(np.float32), (1.0, 1.0, 2.0)))
        assert "\n" not in str(error.value)
    ct = rng.uniform(-50, 80, (20, 20, 10)).astype(np.float32)
    ct[:3] = -1000  # air beside the body
    assert case_features(nothing, Volume(ct, (1.0, 1.0, 2.0))).channels is None


def test_spatial_augmentations_move_channels_with_their_voxels():
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

    from nnunet_ape.nnunet.channel_augmentation import is_intensity_transform

    torch.manual_seed(1)
    transforms = _training_transforms()
    spatial = ComposeTransforms([t for t in transforms.transforms if not is_intensity_transform(t)])
    volume = torch.randn(40, 40, 40)
    out = spatial(image=torch.stack([volume, volume.clone()]), segmentation=torch.zeros(1, 40, 40, 40, dtype=torch.int16))
    assert out["image"].shape[1:] == (32, 32, 32)
    assert torch.equal(out["image"][0], out["image"][1])


def _apply_in_child(payload: bytes, queue) -> None:
    transforms, image = pickle.loads(payload)
    queue.put(transforms(image=image, segmentation=torch.zeros(1, 32, 32, 32, dtype=torch.int16))["image"][1].sum().item())


def test_wrapped_transforms_run_in_a_spawned_worker():
    from nnunet_ape.nnunet.channel_augmentation import intensity_on_image_channels

    image = torch.stack([torch.randn(32, 32, 32), torch.ones(32, 32, 32)])
    transforms = intensity_on_image_channels(_training_transforms(), 1)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    worker = context.Process(target=_apply_in_child, args=(pickle.dumps((transforms, image)), queue))
    worker.start()
    total = queue.get(timeout=120)
    worker.join(60)
    assert worker.exitcode == 0 and total > 0


def test_predicted_box_maps_into_the_preprocessed_grid_and_back():
    from nnunet_ape.nnunet.validation_boxes import to_predicted_box

    # source x, y, z = 100, 80, 40 voxels; nnU-Net's arrays are z, y, x; training crop = x 10-90, y 5-75, z 0-40;
    # resampled by 0.5 in-plane (preprocessed 40 x 35 x 40 for the 40 x 70 x 80 crop)
    props = {"nnunet_ape": {"predicted_box_voxels": [[30, 21, 10], [60, 51, 30]], "transpose_forward": [0, 1, 2]},
             "bbox_used_for_cropping": [[0, 40], [5, 75], [10, 90]], "shape_after_cropping_and_before_resampling": (40, 70, 80),
             "shape_before_cropping": (40, 80, 100)}
    data = np.arange(40 * 35 * 40, dtype=np.float32).reshape(1, 40, 35, 40)
    seg = np.zeros((1, 40, 35, 40), dtype=np.int8)
    cut, cut_seg, new = to_predicted_box(data, seg, props)
    assert cut.shape == cut_seg.shape == (1, 20, 15, 15)
    region = np.asarray(new["bbox_used_for_cropping"])
    assert np.array_equal(region, [[10, 30], [21, 51], [30, 60]])  # z, y, x: the predicted box exactly
    assert tuple(new["shape_after_cropping_and_before_resampling"]) == (20, 30, 30)
    assert props["bbox_used_for_cropping"][0] == [0, 40]  # the stored properties are not modified
    props["nnunet_ape"]["predicted_box_voxels"] = [[30, 20, 10], [60, 50, 30]]  # off the preprocessed grid: rounds outwards
    cut, _, new = to_predicted_box(data, seg, props)
    assert cut.shape == (1, 20, 16, 15) and new["bbox_used_for_cropping"][1] == [19, 51]


def _tiny_network(channels: int):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    kwargs = {"n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 2,
              "strides": [[1, 1, 1], [2, 2, 2]], "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1], "conv_bias": True,
              "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
              "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    return get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet", kwargs,
                                  ["conv_op", "norm_op", "dropout_op", "nonlin"], channels, 3, deep_supervision=False)


def test_pretrained_one_channel_weights_into_a_four_channel_network(tmp_path):
    from nnunet_ape.nnunet.pretrained_weights import load_pretrained_weights_adding_channels

    torch.manual_seed(0)
    ct_model, channels_model = _tiny_network(1), _tiny_network(4)
    torch.save({"network_weights": ct_model.state_dict()}, tmp_path / "ct.pth")
    widened = load_pretrained_weights_adding_channels(channels_model, str(tmp_path / "ct.pth"))
    state = channels_model.state_dict()
    assert "encoder.stages.0.0.convs.0.conv.weight" in widened and all(state[k].shape[1] == 4 for k in widened)
    first = state["encoder.stages.0.0.convs.0.conv.weight"]
    assert torch.equal(first[:, :1], ct_model.state_dict()["encoder.stages.0.0.convs.0.conv.weight"])
    assert not first[:, 1:].any()
    heads = {k: v for k, v in ct_model.state_dict().items() if ".seg_layers." in k and k.endswith("weight")}
    assert heads and not any(torch.equal(state[k], v) for k, v in heads.items())  # heads are not transferred (as nnU-Net)
    channels_model.load_state_dict({**state, **heads})
    ct_model.eval(), channels_model.eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():  # the new channels start at zero weight: the network computes what the CT model did
        out_ct = ct_model(x)
        out_channels = channels_model(torch.cat([x, torch.randn(1, 3, 16, 16, 16)], 1))
    assert torch.allclose(out_channels, out_ct, atol=1e-5)


def test_pretrained_weights_of_another_architecture_are_refused(tmp_path):
    from nnunet_ape.nnunet.pretrained_weights import load_pretrained_weights_adding_channels

    state = _tiny_network(1).state_dict()
    state["encoder.stages.1.0.convs.0.conv.weight"] = torch.zeros(2, 4, 3, 3, 3)
    torch.save({"network_weights": state}, tmp_path / "other.pth")
    with pytest.raises(RuntimeError, match="only input channels may be added"):
        load_pretrained_weights_adding_channels(_tiny_network(4), str(tmp_path / "other.pth"))


def _settings(organs, channels=(), sha="a"):
    from nnunet_ape.nnunet.ape_plans import APESettings

    return APESettings("3d_fullres", list(organs), {o: i + 1 for i, o in enumerate(organs)}, list(channels), 10.0,
                       {"localizer": "/x/loc.json", "localizer_sha256": sha})


def test_plans_gain_configurations_keep_the_others_and_a_backup(tmp_path):
    from nnunet_ape.errors import InputError
    from nnunet_ape.nnunet.ape_plans import add_configurations, configuration_name, resolved_configuration, settings_of

    (tmp_path / "nnUNetPlans.json").write_text(json.dumps(PLANS))
    name = configuration_name("3d_fullres", ["liver"], ["ape", "bpr"])
    assert name == "3d_fullres_ape_liver_ape_bpr"
    assert configuration_name("3d_fullres", [], ["ape"]) == "3d_fullres_ape"
    changed, backup = add_configurations(tmp_path, "nnUNetPlans", {name: _settings(["liver"], ["ape", "bpr"])})
    assert changed == [name] and json.loads(backup.read_text()) == PLANS
    plans = json.loads((tmp_path / "nnUNetPlans.json").read_text())
    assert {k: plans["configurations"][k] for k in PLANS["configurations"]} == PLANS["configurations"]
    config = resolved_configuration(plans, name)
    assert plans["configurations"][name]["inherits_from"] == "3d_fullres"
    assert config["patch_size"] == [96, 128, 128]  # inherited
    assert config["normalization_schemes"] == ["CTNormalization", "NoNormalization", "NoNormalization", "NoNormalization", "NoNormalization"]
    assert config["data_identifier"] == f"nnUNetPlans_{name}" and config["preprocessor_name"] == "nnUNetAPEPreprocessor"
    assert settings_of(config).channel_names == ["APE_x", "APE_y", "APE_z", "BPR"] and settings_of(config).trainer == "nnUNetTrainerAPECropChannels"

    assert add_configurations(tmp_path, "nnUNetPlans", {name: _settings(["liver"], ["ape", "bpr"])}) == ([], None)  # same: no-op
    with pytest.raises(InputError, match="--overwrite"):
        add_configurations(tmp_path, "nnUNetPlans", {name: _settings(["liver"], ["ape", "bpr"], sha="b")})
    changed, _ = add_configurations(tmp_path, "nnUNetPlans", {name: _settings(["liver"], ["ape", "bpr"], sha="b")}, overwrite=True)
    assert changed == [name] and len(list(tmp_path.glob("nnUNetPlans.json.bak-*"))) == 2


def test_organ_summary_keeps_the_chosen_labels():
    from nnunet_ape.nnunet.organ_summary import organ_summary

    case = {"metrics": {"1": {"Dice": 0.8}, "2": {"Dice": 0.0}}, "reference_file": "r", "prediction_file": "p"}
    summary = {"metric_per_case": [case], "mean": {"1": {"Dice": 0.8}, "2": {"Dice": 0.0}}, "foreground_mean": {"Dice": 0.4}}
    out = organ_summary(summary, [1])
    assert out["foreground_mean"]["Dice"] == pytest.approx(0.8) and list(out["mean"]) == ["1"]
    assert list(out["metric_per_case"][0]["metrics"]) == ["1"] and out["metric_per_case"][0]["reference_file"] == "r"
    with pytest.raises(ValueError):
        organ_summary(summary, [3])


def test_trainers_path_holds_the_reexport_module(capsys):
    assert main(["trainers-path"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    module = (folder / "nnunet_ape_trainers.py").read_text()
    assert "from nnunet_ape.nnunet.trainers import *" in module and "class " not in module


def test_plan_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    assert main(["plan", "-d", "501"]) == 2
    assert "give -l LOCALIZER" in capsys.readouterr().err
    assert main(["plan", "-d", "501", "--channels", "ape", "-m", "x.pt"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nnUNetv2_plan_and_preprocess -d 501" in err
    folder = tmp_path / "Dataset501_Abd"
    folder.mkdir()
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}, "channel_names": {"0": "CT"}}))
    (folder / "nnUNetPlans.json").write_text(json.dumps(PLANS))
    assert main(["plan", "-d", "501", "--channels", "ape", "-m", "x.pt", "-c", "3d_lowres"]) == 2
    assert "-c 3d_lowres: not in nnUNetPlans.json" in capsys.readouterr().err
    assert main(["plan", "-d", "501", "--channels", "mri"]) == 2
    assert "--channels mri: unknown channel" in capsys.readouterr().err


def test_cascade_bases_are_refused_before_anything_is_written_and_lowres_stands_alone(tmp_path, monkeypatch, capsys):
    """-c 3d_cascade_fullres would fail at its first training batch (no previous-stage predictions): one line, no
    models loaded, no plans written. On 3d_lowres the configuration is a stand-alone model: no next stage, so
    nnU-Net's validation makes no cascade inputs."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ape.nnunet.ape_plans import add_configurations

    plans = json.loads(json.dumps(PLANS))
    plans["configurations"]["3d_fullres"]["architecture"] = {"network_class_name": "PlainConvUNet", "arch_kwargs": {}, "_kw_requires_import": []}
    plans["configurations"]["3d_lowres"] = {**plans["configurations"]["3d_fullres"], "data_identifier": "nnUNetPlans_3d_lowres",
                                            "spacing": [5.0, 3.0, 3.0], "next_stage": "3d_cascade_fullres"}
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    folder = tmp_path / "Dataset501_Abd"
    folder.mkdir()
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}, "channel_names": {"0": "CT"}}))
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans))
    assert main(["plan", "-d", "501", "--channels", "ape", "-m", str(tmp_path / "missing.pt"), "-c", "3d_cascade_fullres"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "-c 3d_cascade_fullres: cascade stages" in err and "3d_lowres" in err
    assert json.loads((folder / "nnUNetPlans.json").read_text()) == plans and not list(folder.glob("*.bak-*"))

    lowres = _settings(["liver"])
    lowres.base = "3d_lowres"
    add_configurations(folder, "nnUNetPlans", {"3d_lowres_ape_liver": lowres})
    manager = PlansManager(str(folder / "nnUNetPlans.json"))
    assert manager.get_configuration("3d_lowres_ape_liver").next_stage_names is None
    assert manager.get_configuration("3d_lowres").next_stage_names == ["3d_cascade_fullres"]  # the stock one untouched
    assert manager.get_configuration("3d_lowres_ape_liver").spacing == [5.0, 3.0, 3.0]


def test_preprocess_refuses_a_stock_configuration(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    for root in ("pre", "raw"):
        folder = tmp_path / root / "Dataset501_Abd"
        (folder / "imagesTr").mkdir(parents=True)
        (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}, "channel_names": {"0": "CT"},
                                                         "file_ending": ".nii.gz", "numTraining": 0}))
    (tmp_path / "pre" / "Dataset501_Abd" / "nnUNetPlans.json").write_text(json.dumps(PLANS))
    assert main(["preprocess", "-d", "501", "-c", "3d_fullres", "--device", "cpu"]) == 2
    assert "nnUNetv2_preprocess -d Dataset501_Abd -c 3d_fullres" in capsys.readouterr().err


def test_touched_faces_ignore_the_image_border_and_growth_is_clipped():
    from nnunet_ape.nnunet.region_prediction import grow_faces, touched_faces

    shape = (100, 80, 60)
    box = np.array([[0, 10, 20], [50, 80, 40]])  # x starts at the image border, y ends at it
    mask = np.zeros((50, 70, 20), bool)
    mask[0, 30, 10] = mask[10, 0, 10] = mask[10, 69, 10] = mask[49, 30, 10] = True  # on x-low, y-low, y-high, x-high
    assert touched_faces(mask, box, shape) == [(0, 1), (1, 0)]  # x-high and y-low; x-low and y-high are the border
    grown = grow_faces(box, [(0, 1), (1, 0)], grow_mm=20.0, fraction=0.25, spacing=(1.0, 2.0, 3.0), shape=shape)
    # x-high: max(20 mm, 25% of 50 mm) = 20 voxels of 1 mm; y-low: max(20 mm, 25% of 140 mm) = 35 mm -> 18 voxels, clipped at 0
    assert grown.tolist() == [[0, 0, 20], [70, 80, 40]]
    assert touched_faces(np.zeros((50, 70, 20), bool), box, shape) == []


def test_predict_errors_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys):
    ct = tmp_path / "ct.nii.gz"
    import SimpleITK as sitk

    sitk.WriteImage(sitk.Image(16, 16, 16, sitk.sitkInt16), str(ct))
    out = tmp_path / "seg"
    monkeypatch.delenv("nnUNet_results", raising=False)
    assert main(["predict", "-i", str(ct), "-o", str(out), "-d", "501"]) == 2
    assert "nnUNet_results is not set" in capsys.readouterr().err
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    model = tmp_path / "results" / "Dataset501_Abd" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    model.mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps(PLANS))
    (model / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}, "channel_names": {"0": "CT"},
                                                    "file_ending": ".nii.gz", "numTraining": 1}))
    assert main(["predict", "-i", str(ct), "-o", str(out), "-d", "502"]) == 2
    assert "-d 502: no such dataset" in capsys.readouterr().err
    assert main(["predict", "-i", str(ct), "-o", str(out), "-d", "501", "-c", "3d_lowres"]) == 2
    assert "-c 3d_lowres: no model trained" in capsys.readouterr().err
    assert main(["predict", "-i", str(ct), "-o", str(out), "-d", "501", "-f", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint_final.pth for fold 0" in err
    assert main(["predict", "-i", str(ct), "-o", str(out), "-d", "501", "--num-parts", "2", "--part-id", "2"]) == 2
    assert "--part-id 2 --num-parts 2" in capsys.readouterr().err
    assert main(["predict", "-i", str(tmp_path / "missing.nii.gz"), "-o", str(out), "-d", "501"]) == 2
    assert "no such file, folder or nnU-Net dataset" in capsys.readouterr().err
    assert not out.exists()


def test_multichannel_inputs_are_found_by_nnunet_naming(tmp_path):
    from nnunet_ape.errors import InputError
    from nnunet_ape.nnunet.localized_predict import source_channel_files

    for name in ("case_0000.nii.gz", "case_0001.nii.gz", "ct.nii.gz"):
        (tmp_path / name).touch()
    assert source_channel_files(tmp_path / "case_0000.nii.gz", 2) == [tmp_path / "case_0000.nii.gz", tmp_path / "case_0001.nii.gz"]
    with pytest.raises(InputError, match="case_0002.nii.gz: missing channel file"):
        source_channel_files(tmp_path / "case_0000.nii.gz", 3)
    with pytest.raises(InputError, match="name the files CASE_0000.nii.gz"):
        source_channel_files(tmp_path / "ct.nii.gz", 2)
