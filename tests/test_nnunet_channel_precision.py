"""``nnunet-ape plan --channel-precision float16`` (issue 29, item 9): the embedding channels are stored rounded to
float16 values in nnU-Net's float32 arrays, so the preprocessed files shrink while nnU-Net reads them as it always
did; the CT channel is untouched, and the channels trainer's own data loader still gives batches of every channel.

Fast: the small synthetic dataset of ``test_nnunet_preprocess`` (3 cases, untrained tiny APE), preprocessed in
process; the data loader runs in this process too (``nnUNet_n_proc_DA=0``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from test_nnunet_preprocess import DATASET, _point_nnunet, plan_dataset

CONFIGURATIONS = {"float32": "3d_fullres_ape", "float16": "3d_fullres_ape_fp16"}


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory) -> dict:
    """The synthetic dataset with whole-image APE-channel configurations at both precisions, preprocessed together
    (one APE pass per case); returns its roots and nnUNet_preprocessed folder."""
    from nnunet_ape.cli.main import main
    from nnunet_ape.nnunet.preprocess_runner import PreprocessJob, preprocess_configurations

    planned = plan_dataset(tmp_path_factory.mktemp("precision"))
    roots = planned["roots"]
    folder = roots["nnUNet_preprocessed"] / DATASET
    with pytest.MonkeyPatch.context() as mp:
        _point_nnunet(mp, roots["nnUNet_raw"], roots["nnUNet_preprocessed"])
        for precision in CONFIGURATIONS:
            assert main(["plan", "-d", "777", "-m", str(planned["checkpoint"]), "--channels", "ape",
                         "--channel-precision", precision]) == 0
        raw = roots["nnUNet_raw"] / DATASET
        preprocess_configurations([PreprocessJob(folder, raw, "nnUNetPlans", c, 1, "cpu") for c in CONFIGURATIONS.values()])
    return {"roots": roots, "folder": folder}


def _cases(folder: Path) -> dict[str, tuple[np.ndarray, int]]:
    """Per case of a data folder: its data array ``(C, Z, Y, X)`` and the size of its ``.b2nd`` file (bytes)."""
    import blosc2

    files = sorted(p for p in folder.glob("*.b2nd") if not p.name.endswith("_seg.b2nd"))
    return {p.stem: (blosc2.open(urlpath=str(p), mode="r")[:], p.stat().st_size) for p in files}


def test_float16_channels_are_rounded_in_float32_files_that_are_smaller(preprocessed):
    plans = json.loads((preprocessed["folder"] / "nnUNetPlans.json").read_text())["configurations"]
    assert "channel_precision" not in plans[CONFIGURATIONS["float32"]]["nnunet_ape"]  # plans as before the option
    assert plans[CONFIGURATIONS["float16"]]["nnunet_ape"]["channel_precision"] == "float16"
    full = _cases(preprocessed["folder"] / f"nnUNetPlans_{CONFIGURATIONS['float32']}")
    half = _cases(preprocessed["folder"] / f"nnUNetPlans_{CONFIGURATIONS['float16']}")
    assert full.keys() == half.keys() and len(full) == 3
    for case, (data, size) in full.items():
        rounded, rounded_size = half[case]
        assert data.dtype == rounded.dtype == np.float32 and data.shape == rounded.shape and data.shape[0] == 4
        assert np.array_equal(data[0], rounded[0])  # the CT channel as nnU-Net wrote it
        added = rounded[1:]
        assert np.array_equal(added, added.astype(np.float16).astype(np.float32))  # float16 values
        assert np.array_equal(added, data[1:].astype(np.float16).astype(np.float32))  # the nearest ones
        assert np.abs(added - data[1:]).max() > 0
        assert rounded_size < 0.85 * size, (case, rounded_size, size)


def test_the_channels_trainer_loads_float16_channel_batches(preprocessed, monkeypatch):
    from nnunet_ape.nnunet.trainers import nnUNetTrainerAPEChannels

    for name in ("nnUNet_preprocessed", "nnUNet_results"):  # nnU-Net 2.8 reads its folders when it uses them
        monkeypatch.setenv(name, str(preprocessed["roots"][name]))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # loader and transforms in this process
    plans = json.loads((preprocessed["folder"] / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # what nnUNetv2_train adds
    dataset_json = json.loads((preprocessed["folder"] / "dataset.json").read_text())
    trainer = nnUNetTrainerAPEChannels(plans, CONFIGURATIONS["float16"], "all", dataset_json, torch.device("cpu"))
    trainer.initialize()
    train, _ = trainer.get_dataloaders()
    for _ in range(3):
        batch = next(train)
        data = batch["data"]
        assert data.dtype == torch.float32 and data.shape[:2] == (trainer.batch_size, 4)
        assert torch.isfinite(data).all()
        assert data[:, 1:].abs().sum() > 0  # the APE channels came through


def test_float16_values_beyond_its_range_are_refused_and_float32_is_untouched():
    from nnunet_ape.errors import InputError
    from nnunet_ape.nnunet.preprocessor import round_added_channels

    data = np.random.default_rng(0).normal(size=(3, 4, 5, 6)).astype(np.float32)
    assert round_added_channels(data.copy(), 2, "float32").tobytes() == data.tobytes()
    rounded = round_added_channels(data.copy(), 2, "float16")
    assert np.array_equal(rounded[0], data[0]) and np.abs(rounded[1:] - data[1:]).max() <= 2.0**-11 * np.abs(data[1:]).max()
    data[2, 0, 0, 0] = 1e5
    with pytest.raises(InputError, match="--channel-precision float32"):
        round_added_channels(data, 2, "float16")


def test_settings_names_and_plans_of_the_precision():
    from nnunet_ape.errors import InputError
    from nnunet_ape.nnunet.ape_plans import APESettings, configuration_name

    args = ("3d_fullres", [], {}, ["ape"], 10.0, {"ape_checkpoint": "/x/ape.pt", "ape_sha256": "a"})
    old = APESettings(*args).to_json()
    assert "channel_precision" not in old and APESettings.from_json(old).channel_precision == "float32"
    assert APESettings.from_json(APESettings(*args, channel_precision="float16").to_json()).channel_precision == "float16"
    assert configuration_name("3d_fullres", ["liver"], ["ape", "bpr"], "float16") == "3d_fullres_ape_liver_ape_bpr_fp16"
    assert configuration_name("3d_fullres", [], ["ape"]) == "3d_fullres_ape"
    with pytest.raises(InputError, match="add --channels"):
        APESettings("3d_fullres", ["liver"], {"liver": 1}, [], 10.0, {}, channel_precision="float16")
    with pytest.raises(InputError, match="choose from float32, float16"):
        APESettings(*args, channel_precision="int8")


def test_plan_refuses_a_precision_without_channels(preprocessed, monkeypatch, capsys):
    from nnunet_ape.cli.main import main

    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed["roots"]["nnUNet_preprocessed"]))
    assert main(["plan", "-d", "777", "-l", "/nonexistent.json", "--channel-precision", "float16"]) == 2
    assert "applies to embedding channels; add --channels" in capsys.readouterr().err


class _Stop(Exception):
    pass


def test_predict_rounds_the_channels_of_a_float16_model_as_training_did(tmp_path, monkeypatch):
    from dataclasses import replace

    from test_predict_paths import _ct, _stock_model

    from nnunet_ape.nnunet.region_prediction import predict_region

    ct = _ct(0)
    added = np.random.default_rng(1).normal(size=(*ct.shape, 3)).astype(np.float32)
    box = np.array([[2, 3, 1], [28, 24, 19]])
    seen = {}

    def record(data):
        seen["data"] = data.numpy().copy()
        raise _Stop  # the random stock network reads one channel: what it was given is all this test needs

    stock = _stock_model(tmp_path)
    monkeypatch.setattr(stock.predictor, "predict_logits_from_preprocessed_data", record)
    inputs = {}
    for precision in ("float32", "float16"):
        model = replace(stock, kind="channels", added_channels=("ape",), channel_precision=precision)
        with pytest.raises(_Stop):
            predict_region(model, [ct], added, box, confidence=False)
        inputs[precision] = seen["data"]
    full, half = inputs["float32"], inputs["float16"]
    assert full.shape[0] == half.shape[0] == 4 and np.array_equal(full[0], half[0])
    assert np.array_equal(half[1:], full[1:].astype(np.float16).astype(np.float32)) and not np.array_equal(half[1:], full[1:])
