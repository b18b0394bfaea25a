"""``nnunet-ape predict`` without needless probabilities and with background I/O (issue 29, item 7).

- nnU-Net's argmax path (``return_probabilities=False``) wherever merging needs no per-voxel probability: one model,
  or models whose boxes do not overlap; the labels equal those of the probability path.
- The next case is read (and, when asked, localized) while a case predicts, and the outputs are written in a
  background thread; the files equal those of the sequential run.

A tiny stock nnU-Net model with random weights (built here, no training) and stub models with a fake prediction."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_ape.io import Volume, read_volume, write_volume

LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}


def _plans(spacing: list[float]) -> dict:
    """nnU-Net plans of one ``3d_fullres`` configuration with a tiny PlainConvUNet (16^3 patch)."""
    kwargs = {"n_stages": 3, "features_per_stage": [4, 8, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
              "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage": [1, 1, 1],
              "n_conv_per_stage_decoder": [1, 1], "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
              "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
              "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    resampling = {"resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
                  "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                  "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                  "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                  "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}}
    configuration = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
                     "patch_size": [16, 16, 16], "median_image_size_in_voxels": [24, 24, 24], "spacing": spacing,
                     "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False], **resampling,
                     "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                      "arch_kwargs": kwargs, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}
    return {"dataset_name": "Dataset990_Tiny", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": spacing,
            "original_median_shape_after_transp": [24, 24, 24], "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": configuration},
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {}}


def _stock_model(root: Path, seed: int = 0):
    """A stock ``nnUNetTrainer`` results folder (fold 0) whose random network labels the image with several labels;
    opened as ``nnunet-ape predict`` opens it."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnunet_ape.nnunet.trained_model import PredictorOptions, open_model

    folder = root / "Dataset990_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    plans = _plans([2.0, 1.5, 1.5])  # not the CTs' spacing: nnU-Net resamples in and out
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 1,
                                                     "file_ending": ".nii.gz"}))
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(seed)
    network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, len(LABELS),
                                     deep_supervision=False)
    state = network.state_dict()
    for key in state:
        if ".seg_layers." in key:  # outputs that vary over the image: several labels
            state[key] = torch.randn_like(state[key]) * (3.0 if key.endswith("weight") else 0.0)
    torch.save({"network_weights": state, "trainer_name": "nnUNetTrainer", "init_args": {"configuration": "3d_fullres"},
                "inference_allowed_mirroring_axes": None}, folder / "fold_0" / "checkpoint_final.pth")
    return open_model(folder, None, "checkpoint_final.pth", PredictorOptions(use_mirroring=False, device="cpu"))


def _ct(seed: int, shape=(30, 26, 20)) -> Volume:
    rng = np.random.default_rng(seed)
    x = np.linspace(-1, 1, shape[0])[:, None, None]
    array = 400 * x + rng.normal(0, 300, shape)  # a gradient and noise: background and labels
    return Volume(array.astype(np.float32), (1.2, 1.2, 2.5), (5.0, -3.0, 10.0), np.eye(3))


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    return _stock_model(tmp_path_factory.mktemp("results"))


def _record_conversions(monkeypatch) -> tuple[list, list]:
    """Wrap nnU-Net's logits -> segmentation export step and its softmax: what was asked and what came back."""
    from nnunetv2.inference import export_prediction
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    conversions, softmaxes = [], []
    convert = export_prediction.convert_predicted_logits_to_segmentation_with_correct_shape
    nonlin = LabelManager.apply_inference_nonlin

    def recorded(logits, *args, return_probabilities=False, **kwargs):
        out = convert(logits, *args, return_probabilities=return_probabilities, **kwargs)
        parts = out if isinstance(out, tuple) else (out,)
        conversions.append((return_probabilities, [(np.asarray(p).dtype, np.asarray(p).shape) for p in parts]))
        return out

    monkeypatch.setattr(export_prediction, "convert_predicted_logits_to_segmentation_with_correct_shape", recorded)
    monkeypatch.setattr(LabelManager, "apply_inference_nonlin", lambda self, logits: softmaxes.append(tuple(logits.shape)) or nonlin(self, logits))
    return conversions, softmaxes


def test_argmax_path_gives_the_probability_paths_labels_without_probabilities(stock, monkeypatch):
    from nnunet_ape.nnunet.localized_predict import LocalizedPredictor, PredictOptions
    from nnunet_ape.nnunet.region_prediction import predict_region

    ct = _ct(0)
    conversions, softmaxes = _record_conversions(monkeypatch)
    box = np.array([[2, 3, 1], [28, 24, 19]])
    with_probabilities = predict_region(stock, [ct], None, box, confidence=True)
    assert conversions[-1][0] is True and len(softmaxes) == 1 and softmaxes[0][0] == len(LABELS)
    argmax = predict_region(stock, [ct], None, box, confidence=False)
    box_zyx = tuple(int(b - a) for a, b in zip(*box))[::-1]
    # nnU-Net's argmax path: one integer label map of the box comes back, no softmax, no (C, Z, Y, X) float32
    asked, returned = conversions[-1]
    assert asked is False and len(returned) == 1 and np.issubdtype(returned[0][0], np.integer) and returned[0][1] == box_zyx
    assert len(softmaxes) == 1 and argmax.confidence is None and argmax.probabilities is None
    assert np.array_equal(argmax.labels, with_probabilities.labels) and len(np.unique(argmax.labels)) >= 3

    # predict: one model never needs probabilities (unless --save_probabilities); the label maps are the same
    conversions.clear()
    one = LocalizedPredictor([stock], "cpu").predict_case([ct])
    assert [asked for asked, _ in conversions] == [False] and len(softmaxes) == 1
    saved = LocalizedPredictor([stock], "cpu", PredictOptions(save_probabilities=True)).predict_case([ct])
    assert [asked for asked, _ in conversions] == [False, True]
    assert np.array_equal(one.labels.array, saved.labels.array) and one.probabilities is None and saved.probabilities


@dataclass
class _Stub:
    """What LocalizedPredictor reads of a crop model; its prediction is the fake below."""

    name: str
    organ: str
    value: int
    kind: str = "crop"
    feature_args: dict | None = None
    added_channels: tuple = ()
    to_output: dict = field(default_factory=dict)
    output_labels: dict = field(default_factory=lambda: dict(LABELS))
    source_channels: int = 1
    file_ending: str = ".nii.gz"

    @property
    def organs(self) -> list[str]:
        return [self.organ]

    @property
    def crops(self) -> bool:
        return True


SHAPE = (40, 20, 20)


def _fake_region(calls: list, organs: dict):
    """A prediction: the model's label on its organ (``organs[name]``: x range on the whole CT) inside the box, with
    a probability that rises along x for the first model and falls for the second (so overlaps split)."""
    from nnunet_ape.nnunet.region_prediction import RegionPrediction

    def predicted(model, channels, added, box, keep_probabilities=False, confidence=True):
        calls.append((model.name, tuple(map(tuple, box.tolist())), confidence))
        x = np.arange(SHAPE[0])[:, None, None] * np.ones(SHAPE)
        low, high = organs[model.name]
        labels = np.where((x >= low) & (x < high), model.value, 0).astype(np.uint16)
        p = 0.5 + 0.01 * x if model.value == 1 else 0.9 - 0.01 * x
        cut = tuple(slice(a, b) for a, b in zip(*box))
        keep = {model.value: p[cut].astype(np.float32)} if keep_probabilities else None
        return RegionPrediction(labels[cut], np.where(labels[cut] > 0, p[cut], 0).astype(np.float32) if confidence or keep_probabilities else None, keep)

    return predicted


def _features(boxes: dict):
    from nnunet_ape.case_features import CaseFeatures

    def features(models, ct, passes):
        organ, box = models
        return CaseFeatures({organ: {"crop_box_voxels": box, "placed": True}}, np.asarray(box), None)

    return features


@pytest.mark.parametrize("case", ["disjoint", "overlapping", "regrown into the other"])
def test_merge_asks_for_probabilities_only_where_boxes_overlap(case, monkeypatch):
    from nnunet_ape.nnunet import localized_predict
    from nnunet_ape.nnunet.localized_predict import LocalizedPredictor, PredictOptions

    boxes = {"disjoint": ([[0, 0, 0], [15, 20, 20]], [[25, 0, 0], [40, 20, 20]]),
             "overlapping": ([[0, 0, 0], [22, 20, 20]], [[18, 0, 0], [40, 20, 20]]),
             "regrown into the other": ([[0, 0, 0], [15, 20, 20]], [[25, 0, 0], [40, 20, 20]])}[case]
    # organs along x: inside their boxes; in the last case the spleen reaches below its box's low face (regrowth)
    organs = {"liver": (2, 12), "spleen": (28, 38)} if case == "disjoint" else \
        {"liver": (2, 20), "spleen": (19, 38)} if case == "overlapping" else {"liver": (2, 14), "spleen": (8, 38)}
    monkeypatch.setattr(localized_predict, "case_features", _features(boxes))
    ct = Volume(np.full(SHAPE, -1000.0, np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    results = {}
    for keep in (False, True):
        calls = []
        monkeypatch.setattr(localized_predict, "predict_region", _fake_region(calls, organs))
        models = [_Stub("liver", "liver", 1, to_output={1: 1}), _Stub("spleen", "spleen", 2, to_output={2: 2})]
        predictor = LocalizedPredictor(models, "cpu", PredictOptions(save_probabilities=keep))
        predictor.feature_models = [("liver", boxes[0]), ("spleen", boxes[1])]
        results[keep] = (predictor.predict_case([ct]), calls)
    merged, calls = results[False]
    with_probabilities, all_calls = results[True]
    assert all(confidence for _, _, confidence in all_calls)  # --save_probabilities: the probability path throughout
    # the label maps are the same whichever path each prediction took
    assert np.array_equal(merged.labels.array, with_probabilities.labels.array)
    if case == "disjoint":
        assert [(n, c) for n, _, c in calls] == [("liver", False), ("spleen", False)]  # nnU-Net's argmax path for both
    elif case == "overlapping":
        assert [c for _, _, c in calls] == [True, True]
        x = merged.labels.array[:, 0, 0]  # x = 19 is labeled by both: spleen 0.71 beats liver 0.69
        assert (x[2:19] == 1).all() and (x[19:38] == 2).all() and not x[:2].any() and not x[38:].any()
    else:
        # liver: argmax (no overlap yet); spleen touches its low face, grows into the liver's box, predicts with
        # probabilities; the liver is then predicted again on its box with probabilities, for the merge
        assert [(n, c) for n, _, c in calls] == [("liver", False), ("spleen", False), ("spleen", True), ("liver", True)]
        assert merged.report["models"][0]["predicted_again_for_merge"] and merged.report["models"][1]["regrown"] == 1
        x = merged.labels.array[:, 0, 0]  # x in 8..13 labeled by both: the spleen is surer there (0.9 - 0.01 x > 0.5 + 0.01 x)
        assert (x[2:8] == 1).all() and (x[8:38] == 2).all() and not x[:2].any() and not x[38:].any()


def _cases(folder: Path, n: int) -> list[Path]:
    folder.mkdir()
    paths = []
    for i in range(n):
        paths.append(write_volume(_ct(10 + i, (24 + 2 * i, 22, 18)), folder / f"case{i}_0000.nii.gz"))
    return paths


def _outputs(folder: Path, n: int) -> list:
    out = []
    for i in range(n):
        report = json.loads((folder / f"case{i}_boxes.json").read_text())
        report.pop("seconds")
        for entry in report["models"]:
            entry.pop("seconds")
        out.append((read_volume(folder / f"case{i}.nii.gz", check_finite=False).array, report))
    return out


def test_predict_files_reads_ahead_writes_behind_and_equals_the_sequential_run(stock, monkeypatch, tmp_path):
    from nnunet_ape.nnunet import localized_predict
    from nnunet_ape.nnunet.localized_predict import LocalizedPredictor, PredictOptions, is_done, predict_files

    images = _cases(tmp_path / "in", 3)
    sequential = LocalizedPredictor([stock], "cpu", PredictOptions(background_io=False))
    predict_files(sequential, images, tmp_path / "seq")

    reads = {i: threading.Event() for i in range(3)}
    seen: dict[str, object] = {}
    read, write = localized_predict.read_channels, localized_predict.write_case

    def reading(files, **kwargs):
        reads[int(Path(files[0]).name[4])].set()
        return read(files, **kwargs)

    def writing(result, output, case, *args):
        if case == "case0":  # still writing case 0 when case 2 starts being read: reading and writing overlap
            seen["read 2 during write 0"] = reads[2].wait(timeout=20)
        seen.setdefault("writer", threading.current_thread().name)
        return write(result, output, case, *args)

    monkeypatch.setattr(localized_predict, "read_channels", reading)
    monkeypatch.setattr(localized_predict, "write_case", writing)
    background = LocalizedPredictor([stock], "cpu", PredictOptions(embed_ahead=True))
    prepare = background.prepare
    monkeypatch.setattr(background, "prepare", lambda channels: seen.setdefault("prepared in", threading.current_thread().name) and prepare(channels))
    counts = predict_files(background, images, tmp_path / "bg")
    assert counts["predicted"] == 3
    assert seen == {"read 2 during write 0": True, "writer": "nnunet-ape-writer", "prepared in": "nnunet-ape-reader"}
    for (a, ra), (b, rb) in zip(_outputs(tmp_path / "seq", 3), _outputs(tmp_path / "bg", 3)):
        assert np.array_equal(a, b) and ra == rb
    assert all(is_done(tmp_path / "bg", f"case{i}", ".nii.gz") for i in range(3))

    # a failed write stops the run with its error; the cases written before it are done, none after it is
    def failing(result, output, case, *args):
        if case == "case1":
            raise OSError("disk full")
        return write(result, output, case, *args)

    monkeypatch.setattr(localized_predict, "write_case", failing)
    with pytest.raises(OSError, match="disk full"):
        predict_files(LocalizedPredictor([stock], "cpu"), images, tmp_path / "failed")
    assert is_done(tmp_path / "failed", "case0", ".nii.gz") and not (tmp_path / "failed" / "case1_boxes.json").exists()
