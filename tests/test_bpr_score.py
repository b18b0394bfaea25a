"""``nnunet-ape score`` and ``calibrate`` on real CT: JSON keys and types, PNG, landmark calibration, checks for
reversed slices, wrong spacing and single slices, score order under resampling and cropping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.stats import spearmanr

from conftest import labeled_patient, patient
from nnunet_ape.bpr.calibration import Calibration, fit_calibration
from nnunet_ape.bpr.report import score_volume
from nnunet_ape.bpr.scoring import load_bpr_model
from nnunet_ape.cli import main
from nnunet_ape.io import Volume, read_volume, write_volume

ANCHORS = ["--anchor", "pelvis_end=10", "--anchor", "L1=30"]  # landmarks patient A shows (it has no pelvis start, no eyes)


@pytest.fixture(scope="module")
def model(bpr_run):
    return load_bpr_model(bpr_run / "checkpoint_final.pt")[0]


@pytest.fixture(scope="module")
def calibration(model):
    return fit_calibration(model, [labeled_patient("A")], {"pelvis_end": 10.0, "L1": 30.0})


def _finite(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def test_score_cli_writes_bpreg_keys_and_png(bpr_run, tmp_path):
    out = tmp_path / "scores"
    assert main(["score", "-m", str(bpr_run / "checkpoint_final.pt"), "-i", str(patient("C")), "-o", str(out), "--png", "--device", "cpu"]) == 0
    result = json.loads((out / "ts_c_chest_cta_ct_bpr.json").read_text())
    ct = read_volume(patient("C"))
    n = ct.shape[2]
    for key in ("cleaned slice scores", "unprocessed slice scores", "z"):
        assert len(result[key]) == n and all(v is None or isinstance(v, float) for v in result[key]), key
    for key in ("body part examined", "body part examined tag", "reverse z-ordering", "valid z-spacing", "z-spacing", "settings"):
        assert key in result, key
    assert result["body part examined tag"] == "NONE" and result["calibrated"] is False  # uncalibrated model
    expected_z = ct.index_to_physical(np.stack([np.zeros(n), np.zeros(n), np.arange(n)], 1))[:, 2]
    assert np.allclose(result["z"], expected_z, atol=1e-2)
    stamp = (out / "ts_c_chest_cta_ct_bpr.json").stat().st_mtime_ns
    assert main(["score", "-m", str(bpr_run / "checkpoint_final.pt"), "-i", str(patient("C")), "-o", str(out), "--device", "cpu"]) == 0
    assert (out / "ts_c_chest_cta_ct_bpr.json").stat().st_mtime_ns == stamp  # a restarted job keeps finished cases
    assert main(["score", "-m", str(bpr_run / "checkpoint_final.pt"), "-i", str(patient("C")), "-o", str(out), "--device", "cpu",
                 "--overwrite"]) == 0
    assert (out / "ts_c_chest_cta_ct_bpr.json").stat().st_mtime_ns != stamp
    cleaned = _finite(result["cleaned slice scores"])
    rho = spearmanr(np.arange(n)[np.isfinite(cleaned)], cleaned[np.isfinite(cleaned)]).correlation
    print(f"patient C: Spearman(cleaned score, z) = {rho:.3f}")
    assert rho > 0.8 and result["reverse z-ordering"] == 0 and result["warnings"] == []
    assert (out / "ts_c_chest_cta_ct_bpr.png").stat().st_size > 10_000


def test_calibrate_cli_stores_landmark_units(bpr_run, tmp_path, capsys):
    model_path = bpr_run / "checkpoint_final.pt"
    case = labeled_patient("A")
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    (images / "A.nii.gz").symlink_to(case.image)
    (labels / "A.nii.gz").symlink_to(case.label)
    source = ["--images", str(images), "--labels", str(labels), "--label-names", str(case.label.parent / "ts_a_labels.json"), "--device", "cpu"]
    out = tmp_path / "calibrated.pt"
    # the default anchors (pelvis start, end of the eyes) are not in patient A: one-line error, no file
    assert main(["calibrate", "-m", str(model_path), *source, "-o", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert error.startswith("nnunet-ape: error:") and "pelvis_start" in error and "--anchor" in error and not out.exists()
    assert main(["calibrate", "-m", str(model_path), *source, *ANCHORS, "-o", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    lookup = state["calibration"]["lookup"]
    assert lookup["pelvis_end"]["mean"] == pytest.approx(10.0) and lookup["L1"]["mean"] == pytest.approx(30.0)
    print("landmark scores on A:", {k: round(v["mean"], 1) for k, v in lookup.items()})
    assert lookup["femur_end"]["mean"] < lookup["L5"]["mean"] < lookup["L3"]["mean"] < lookup["L1"]["mean"]  # anatomy order
    scores = tmp_path / "scores"
    assert main(["score", "-m", str(out), "-i", str(case.image), "-o", str(scores), "--device", "cpu"]) == 0
    result = json.loads((scores / "ts_a_abdomen_pelvis_ct_bpr.json").read_text())
    assert result["calibrated"] and result["look-up table"]["L1"]["mean"] == pytest.approx(30.0)
    assert result["valid z-spacing"] == 1 and 0.72 <= result["slope ratio"] <= 1.28


def test_wrong_slice_spacing_is_flagged(model, calibration):
    ct = read_volume(patient("A"))
    good = score_volume(model, ct, calibration)
    stretched = score_volume(model, Volume(ct.array, (ct.spacing[0], ct.spacing[1], ct.spacing[2] * 2), ct.origin, ct.direction), calibration)
    print(f"slope ratio: true spacing {good['slope ratio']:.2f}, doubled spacing {stretched['slope ratio']:.2f}")
    assert good["valid z-spacing"] == 1 and stretched["valid z-spacing"] == 0
    assert any("spacing" in w for w in stretched["warnings"])


def test_reversed_slices_are_warned_but_a_true_flip_is_not(model):
    ct = read_volume(patient("A"))
    base = score_volume(model, ct)
    # same header, slices stored in reverse: anatomy contradicts the header
    wrong = score_volume(model, ct.with_array(ct.array[:, :, ::-1]))
    assert wrong["reverse z-ordering"] == 1 and any("reverse order" in w for w in wrong["warnings"])
    # a scan stored head first with a header that says so: fine, and the same scores per physical slice
    direction = np.asarray(ct.direction).copy()
    direction[:, 2] *= -1
    top = ct.index_to_physical(np.array([[0, 0, ct.shape[2] - 1]]))[0]
    flipped = score_volume(model, Volume(ct.array[:, :, ::-1].copy(), ct.spacing, tuple(top), direction))
    assert flipped["warnings"] == [] and flipped["reverse z-ordering"] == 1 and base["reverse z-ordering"] == 0
    assert np.allclose(flipped["z"], base["z"][::-1], atol=1e-3)
    assert np.allclose(_finite(flipped["cleaned slice scores"]), _finite(base["cleaned slice scores"])[::-1], atol=1e-3, equal_nan=True)


def test_single_slice_is_an_error_with_no_output(bpr_run, tmp_path, capsys):
    ct = read_volume(patient("A"))
    single = write_volume(Volume(ct.array[:, :, 50:51], ct.spacing, ct.origin, ct.direction), tmp_path / "one_slice.nii.gz")
    out = tmp_path / "scores"
    assert main(["score", "-m", str(bpr_run / "checkpoint_final.pt"), "-i", str(single), "-o", str(out), "--device", "cpu"]) == 2
    assert "too small" in capsys.readouterr().err and not out.exists()


def _physical_z(volume: Volume) -> np.ndarray:
    n = volume.shape[2]
    return volume.index_to_physical(np.stack([np.zeros(n), np.zeros(n), np.arange(n)], 1))[:, 2]


def test_score_order_survives_resampling_and_cropping(model):
    ct = read_volume(patient("A"))
    base = score_volume(model, ct)
    base_z, base_scores = np.asarray(base["z"]), _finite(base["cleaned slice scores"])
    image = sitk.ReadImage(str(patient("A")))
    size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), (2.0, 2.0, 2.0))]
    resampled = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), (2.0, 2.0, 2.0),
                              image.GetDirection(), -1024.0, sitk.sitkFloat32)
    array = np.moveaxis(sitk.GetArrayFromImage(resampled), (0, 1, 2), (2, 1, 0))  # (x, y, z)
    corner = tuple(ct.index_to_physical(np.array([[0, 0, 20]]))[0])
    padded = np.full((ct.shape[0] + 60, ct.shape[1] + 40, ct.shape[2]), -1024, dtype=ct.array.dtype)
    padded[60:, :ct.shape[1]] = ct.array  # a wider, off-centre field of view: air on two sides
    variants = {
        "resampled to 2 mm": Volume(array, (2.0, 2.0, 2.0), resampled.GetOrigin(), np.array(resampled.GetDirection()).reshape(3, 3)),
        "cropped in z": Volume(ct.array[:, :, 20:90], ct.spacing, corner, ct.direction),
        "off-centre field of view": Volume(padded, ct.spacing, tuple(ct.index_to_physical(np.array([[-60, 0, 0]]))[0]), ct.direction),
    }
    for name, volume in variants.items():
        result = score_volume(model, volume)
        z, scores = np.asarray(result["z"]), _finite(result["cleaned slice scores"])
        finite = np.isfinite(scores)
        rho = spearmanr(z[finite], scores[finite]).correlation
        order = np.argsort(base_z)
        on_base = np.interp(z[finite], base_z[order], base_scores[order])
        agreement = np.corrcoef(on_base, scores[finite])[0, 1]
        print(f"{name}: Spearman(score, z) {rho:.3f}, correlation with the original scores at the same z {agreement:.3f}")
        assert rho > 0.8 and agreement > 0.9


def test_body_part_tag_from_a_known_lookup():
    from nnunet_ape.bpr.calibration import body_part_tag, body_parts_examined

    lookup = {name: {"mean": value, "std": 0.0, "n": 1} for name, value in
              {"pelvis_start": 0.0, "pelvis_end": 15.0, "Th9": 40.0, "Th2": 60.0, "C3": 75.0}.items()}
    calibration = Calibration({"pelvis_start": 0.0, "C3": 75.0}, 1.0, 0.0, lookup)
    chest_abdomen = np.linspace(20, 58, 200)  # covers most of the abdomen and the chest
    assert body_part_tag(chest_abdomen, calibration.lookup, 400.0) == "CHEST-ABDOMEN"
    parts = body_parts_examined(chest_abdomen, lookup)
    assert parts["legs"] == [] and parts["chest"][0] == int(np.argmax(chest_abdomen >= 40)) and parts["head"] == []
    assert body_part_tag(np.linspace(41, 45, 20), lookup, 80.0) == "CHEST"  # a short scan: its most frequent part
    assert body_part_tag(np.linspace(-30, -5, 50), lookup, 300.0) == "NONE"  # legs only carry no tag
    no_thorax = {k: v for k, v in lookup.items() if k != "Th9"}
    assert body_parts_examined(chest_abdomen, no_thorax)["chest"] is None


def test_landmark_slices_skip_cut_structures():
    from nnunet_ape.bpr.landmarks import landmark_slices

    label = np.zeros((4, 4, 30), dtype=np.int64)
    label[1:3, 1:3, 5:12] = 1  # vertebrae_L1, fully inside
    label[1:3, 1:3, 20:30] = 2  # liver, cut by the top of the scan
    names = {"vertebrae_L1": 1, "liver": 2}
    found = landmark_slices(label, names, ["L1", "liver_bottom", "liver_top", "L2"])
    assert found == {"L1": 8.0, "liver_bottom": 20.0}
