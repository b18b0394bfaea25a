"""Few-shot localization end to end on real CT: fit on patient A, predict on B, and the reverse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, cli_in_process, patient
from nnunet_ape.io import read_volume, write_volume
from nnunet_ape.localize.boxes import box_iou, mask_box
from nnunet_ape.cases import read_label_names

SHARED_ORGANS = ["liver", "spleen", "stomach", "pancreas", "aorta", "inferior_vena_cava"]  # labeled in both A and B


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nnunet_ape", *args], capture_output=True, text=True)


def _labeled_folder(tmp_path: Path, key: str, extra: dict[str, Path] | None = None) -> tuple[Path, Path, Path]:
    """images/ and labels/ folders holding patient ``key`` (and ``extra`` cases), plus its label-name file."""
    letter = key.lower()
    seg = {"a": "ts_a_abdomen_pelvis_seg.nii.gz", "b": "ts_b_upper_abdomen_seg.nii.gz"}[letter]
    images, labels = tmp_path / f"images_{letter}", tmp_path / f"labels_{letter}"
    images.mkdir()
    labels.mkdir()
    (images / f"case_{letter}_0000.nii.gz").symlink_to(patient(key))
    (labels / f"case_{letter}.nii.gz").symlink_to(DATA / seg)
    for name, (image, label) in (extra or {}).items():
        (images / f"{name}_0000.nii.gz").symlink_to(image)
        (labels / f"{name}.nii.gz").symlink_to(label)
    return images, labels, DATA / f"ts_{letter}_labels.json"


def _true_box(key: str, organ: str) -> np.ndarray:
    letter = key.lower()
    seg = read_volume(DATA / {"a": "ts_a_abdomen_pelvis_seg.nii.gz", "b": "ts_b_upper_abdomen_seg.nii.gz"}[letter])
    return mask_box(seg.array == read_label_names(DATA / f"ts_{letter}_labels.json")[organ])


@pytest.mark.parametrize("train, test, ape_boxes", [
    pytest.param("A", "B", "all-voxels", marks=pytest.mark.slow),  # 25-35 s; label transfer also runs in test_canonical_once, test_localize_label_transfer
    ("B", "A", "edge-points"),
])
def test_fit_on_one_patient_predict_on_the_other(pretrained_run, tmp_path, train, test, ape_boxes):
    images, labels, names = _labeled_folder(tmp_path, train)
    localizer = tmp_path / "localizer.json"
    model = str(pretrained_run / "checkpoint_final.pt")
    fit = _cli("localize", "fit", "-m", model, "--images", str(images), "--labels", str(labels), "--label-names", str(names),
               "--organs", *SHARED_ORGANS, "--shots", "1", "-o", str(localizer), "--device", "cpu", "--ape-boxes", ape_boxes)
    assert fit.returncode == 0, fit.stderr[-2000:]
    content = json.loads(localizer.read_text())
    assert set(content["organs"]) == set(SHARED_ORGANS) and len(content["ape_sha256"]) == 64
    assert all(len(o["shots"][0]["edge_embeddings"]) == 6 for o in content["organs"].values())
    assert content["ape_boxes"] == ape_boxes
    if ape_boxes == "all-voxels":  # the shots' labeled samples: every requested organ among them, other labels dropped
        values = {o["label"] for o in content["organs"].values()}
        stored = content["label_transfer"]
        assert set(stored["labels"]) == values | {0} and len(stored["embeddings"]) == len(stored["labels"]) > 10_000
    else:
        assert "label_transfer" not in content
    out = tmp_path / "boxes"
    pred = _cli("localize", "predict", "-l", str(localizer), "-i", str(patient(test)), "-o", str(out), "--png", "--device", "cpu")
    assert pred.returncode == 0, pred.stderr[-2000:]
    result = json.loads(next(out.glob("*_boxes.json")).read_text())
    volume = read_volume(patient(test))
    shape = np.array(volume.shape)
    ious = {}
    for organ in SHARED_ORGANS:
        entry = result["organs"][organ]
        box, big = np.array(entry["box_voxels"]), np.array(entry["enlarged_box_voxels"])
        assert np.all(box[0] <= box[1]) and np.all(box[0] >= 0) and np.all(box[1] <= shape - 1)
        assert np.all(big[0] <= box[0] + 1e-6) and np.all(big[1] >= box[1] - 1e-6)  # enlarged box contains the box
        assert np.all(big[0] >= 0) and np.all(big[1] <= shape - 1)  # clipped to the image
        assert np.allclose(volume.index_to_physical(box), [entry["box"]["lo_corner_mm"], entry["box"]["hi_corner_mm"]], atol=0.01)
        ious[organ] = box_iou(box, _true_box(test, organ))
        assert entry["ape_boxes"] in ((ape_boxes, "edge-points") if ape_boxes == "all-voxels" else ("edge-points",))
    print(f"fit {train} -> predict {test}, IoU per organ: " + ", ".join(f"{k} {v:.2f}" for k, v in ious.items()))
    assert next(out.glob("*_boxes.png")).stat().st_size > 20_000


def test_two_shots_calibrate_alpha_leave_one_out(pretrained_run, tmp_path):
    ct, seg = read_volume(patient("A")), read_volume(DATA / "ts_a_abdomen_pelvis_seg.nii.gz")
    # second shot: patient A with the lowest 20 slices cut off (another field of view), geometry kept
    cut = (slice(None), slice(None), slice(20, None))
    origin = ct.index_to_physical(np.array([0, 0, 20]))
    crop_ct = type(ct)(ct.array[cut], ct.spacing, tuple(origin), ct.direction)
    crop_seg = type(seg)(seg.array[cut], seg.spacing, tuple(origin), seg.direction)
    extra = {"case_a_cut": (write_volume(crop_ct, tmp_path / "cut_ct.nii.gz"), write_volume(crop_seg, tmp_path / "cut_seg.nii.gz"))}
    images, labels, names = _labeled_folder(tmp_path, "A", extra)
    localizer = tmp_path / "loc.json"
    fit = _cli("localize", "fit", "-m", str(pretrained_run / "checkpoint_final.pt"), "--images", str(images), "--labels",
               str(labels), "--label-names", str(names), "--organs", "liver", "spleen", "--shots", "2", "-o", str(localizer),
               "--device", "cpu", "--combine", "median")
    assert fit.returncode == 0, fit.stderr[-2000:]
    content = json.loads(localizer.read_text())
    for organ in ("liver", "spleen"):
        assert len(content["organs"][organ]["shots"]) == 2
        assert 0 < content["organs"][organ]["alpha"] <= 20  # found by leave-one-shot-out, not the 1-shot default
        assert content["organs"][organ]["alpha"] != 1.5 and content["organs"][organ]["alpha_calibrated"] is True


def test_unknown_and_missing_organs_give_clear_errors(pretrained_run, tmp_path, capsys):
    model = str(pretrained_run / "checkpoint_final.pt")
    images, labels, names = _labeled_folder(tmp_path, "B")
    base = ["localize", "fit", "-m", model, "--images", str(images), "--labels", str(labels), "--label-names", str(names),
            "--shots", "1", "--device", "cpu"]
    unknown = _cli(*base, "--organs", "liver", "unicorn_gland", "-o", str(tmp_path / "u.json"))  # a real process's stderr
    assert unknown.returncode == 2 and "unknown organ 'unicorn_gland'" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    code, _, err = cli_in_process(capsys, *base, "--organs", "liver", "kidney_left", "-o", str(tmp_path / "m.json"))  # B shows no kidneys
    assert code == 2 and "kidney_left" in err and "contoured in none" in err
    assert not (tmp_path / "u.json").exists() and not (tmp_path / "m.json").exists()
    code, _, err = cli_in_process(capsys, *base, "--organs", "liver", "-o", str(tmp_path / "ok.json"))
    assert code == 0, err[-2000:]
    assert "uncalibrated default" in err  # 1 shot: nothing to hold out
    assert json.loads((tmp_path / "ok.json").read_text())["organs"]["liver"]["alpha_calibrated"] is False
    code, _, err = cli_in_process(capsys, "localize", "fit", "-m", model, "--images", str(images), "--labels", str(labels), "--organs",
                                  "liver", "--shots", "1", "--device", "cpu", "-o", str(tmp_path / "n.json"))
    assert code == 2 and "--label-names" in err
    code, _, err = cli_in_process(capsys, "localize", "fit", "-m", model, "--images", str(patient("B")), "--labels",
                                  str(DATA / "ts_b_upper_abdomen_seg.nii.gz"), "--label-names", str(DATA / "ts_b_labels.json"),
                                  "--organs", "liver", "--shots", "1", "--device", "cpu",
                                  "-o", str(tmp_path / "pair.json"))  # one CT file and its label file, names that differ
    assert code == 0, err[-2000:]
    assert json.loads((tmp_path / "pair.json").read_text())["organs"]["liver"]["shots"][0]["case"] == "ts_b_upper_abdomen"
    code, _, err = cli_in_process(capsys, "localize", "fit", "-m", model, "--images", str(patient("B")), "--labels", str(labels),
                                  "--organs", "liver", "--device", "cpu", "-o", str(tmp_path / "mixed.json"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "a CT file and its label file" in err
    code, _, err = cli_in_process(capsys, "localize", "predict", "-l", str(tmp_path / "ok.json"), "-i", str(patient("A")), "-o",
                                  str(tmp_path / "p"), "--organs", "spleen", "--device", "cpu")
    assert code == 2 and "unknown organ 'spleen'" in err and not (tmp_path / "p").exists()


def test_ape_and_bpr_combined_boxes_from_a_to_b(pretrained_run, bpr_run, tmp_path):
    """APE x/y with BPR z: the crop box takes its x/y from the enlarged APE box and its z from the BPR z-range."""
    images, labels, names = _labeled_folder(tmp_path, "A")
    localizer = tmp_path / "localizer.json"
    fit = _cli("localize", "fit", "-m", str(pretrained_run / "checkpoint_final.pt"), "--bpr-model", str(bpr_run / "checkpoint_final.pt"),
               "--images", str(images), "--labels", str(labels), "--label-names", str(names), "--organs", "liver", "spleen",
               "--shots", "1", "--method", "ape_bpr", "-o", str(localizer), "--device", "cpu")
    assert fit.returncode == 0, fit.stderr[-2000:]
    content = json.loads(localizer.read_text())
    assert content["method"] == "ape+bpr" and len(content["bpr_sha256"]) == 64
    assert all(entry["method"] == "ape_bpr" for entry in content["organs"].values())  # one shot's default is APE's own box
    assert "liver reaches the first or last slice" in fit.stderr  # A's liver is cut by the top of the scan
    out = tmp_path / "boxes"
    pred = _cli("localize", "predict", "-l", str(localizer), "-i", str(patient("B")), "-o", str(out), "--png", "--device", "cpu")
    assert pred.returncode == 0, pred.stderr[-2000:]
    result = json.loads(next(out.glob("*_boxes.json")).read_text())
    shape = np.array(read_volume(patient("B")).shape)
    for organ in ("liver", "spleen"):
        entry = result["organs"][organ]
        big, bpr, crop = (np.array(entry[k]) for k in ("enlarged_box_voxels", "bpr_box_voxels", "crop_box_voxels"))
        assert np.array_equal(crop, np.array(entry["combined_box_voxels"]))
        assert np.allclose(crop[:, :2], big[:, :2]) and np.allclose(crop[:, 2], bpr[:, 2])  # B's z axis is its third
        assert np.allclose(bpr[:, :2], [[0, 0], shape[:2] - 1]) and entry["bpr_z_range"] == bpr[:, 2].astype(int).tolist()
        assert np.all(crop[0] >= 0) and np.all(crop[1] <= shape - 1)


HEADNECK = DATA.parent / "Dataset901_HeadNeckCT"


@pytest.mark.slow  # 46 s on 2026-12-07 evening
@pytest.mark.skipif(not HEADNECK.exists(), reason="head-and-neck dataset not available")
def test_one_all_voxels_localizer_for_organs_contoured_in_different_cases(pretrained_run, tmp_path):
    """The esophagus is contoured in fewer cases than the brainstem: one all-voxels localizer holds both, each organ's
    label counted only among the samples of the shots that contour it."""
    out = tmp_path / "partial.json"
    fit = _cli("localize", "fit", "-m", str(pretrained_run / "checkpoint_final.pt"), "-d", str(HEADNECK), "--organs",
               "esophagus", "brainstem", "--shots", "3", "--ape-boxes", "all-voxels", "-o", str(out), "--device", "cpu")
    assert fit.returncode == 0, fit.stderr[-2000:]
    localizer = json.loads(out.read_text())
    esophagus, brainstem = (localizer["organs"][o]["shot_cases"] for o in ("esophagus", "brainstem"))
    assert set(esophagus) != set(brainstem)  # otherwise nothing is partial here
    stored = localizer["label_transfer"]
    assert len(stored["groups"]) == len(stored["labels"]) and sorted(map(sorted, stored["group_values"])) != [[1, 5]]
    values = {json.dumps(sorted(g)) for g in stored["group_values"]}
    assert all(set(json.loads(v)) <= {1, 5} for v in values)
    for entry in localizer["organs"].values():
        assert entry["alpha_calibrated"] is True and entry["selection"]["ape_all"]["recall_mean"] >= 0
    test = HEADNECK / "imagesTr" / "hn_170_0000.nii.gz"
    boxes = tmp_path / "boxes"
    pred = _cli("localize", "predict", "-l", str(out), "-i", str(test), "-o", str(boxes), "--device", "cpu")
    assert pred.returncode == 0, pred.stderr[-2000:]
    result = json.loads((boxes / "hn_170_boxes.json").read_text())["organs"]
    assert {result[o]["ape_boxes"] for o in ("esophagus", "brainstem")} <= {"all-voxels", "edge-points"}
