"""Per-organ method choice (leave-one-shot-out on the shots), body-box localizers and partially contoured data sets."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import DATA, cli_in_process
from test_localize_evaluate import _case
from nnunet_ape.io import read_volume
from nnunet_ape.localize.boxes import box_recall, mask_box
from nnunet_ape.localize.choice import box_in_body, choose, default_method, held_out_body_boxes, mean_relative_box, relative_box
from nnunet_ape.localize.evaluate import evaluate_organ

HEADNECK = DATA.parent / "Dataset901_HeadNeckCT"


def _scores(recalls: list[float], fraction: float, target: float = 0.99) -> dict:
    return {"recall_min": min(recalls), "recall_mean": float(np.mean(recalls)), "crop_fraction": fraction,
            "reached": float(np.mean(recalls)) >= target}


def test_choose_takes_the_model_when_it_matches_the_body_box():
    scores = {"body_box": _scores([1.0, 0.995], 0.30), "ape": _scores([1.0, 0.999], 0.10), "bpr_z": _scores([0.9, 1.0], 0.05)}
    assert choose(scores) == "ape"  # bpr_z is smaller but lost 10 % of one shot's organ (and it is not APE)
    scores["ape"]["crop_fraction"] = 0.31
    assert choose(scores) == "body_box"  # more recall in a larger crop: no better than the trivial baseline
    nothing = {"body_box": _scores([0.8, 0.9], 0.3), "ape": _scores([0.95, 0.97], 0.2)}
    assert choose(nothing) == "ape"  # none reached the target: ape kept more of the organ in a smaller crop


def test_a_model_must_match_the_body_box_on_the_shots_to_replace_it():
    # bpr_z reached the target with the smallest crop, but kept less of the organ than the body box on the shots
    scores = {"body_box": _scores([1.0, 1.0, 1.0], 0.05), "ape": _scores([1.0, 1.0, 0.995], 0.02),
              "bpr_z": _scores([1.0, 1.0, 1.0], 0.01)}
    assert choose(scores) == "body_box"  # bpr_z matched it in a smaller crop, but only the model's own method competes
    scores["ape"] = _scores([1.0, 1.0, 1.0], 0.02)  # as much as the body box kept, in a smaller crop
    assert choose(scores) == "ape"
    scores["ape"] = _scores([1.0, 1.0, 1.0], 0.08)  # as much, but a larger crop: no better than the baseline
    assert choose(scores) == "body_box"
    # below the target everywhere: a model that kept more in a smaller crop still replaces the body box
    weak = {"body_box": _scores([0.5, 0.9], 0.10), "ape": _scores([0.8, 0.9], 0.05), "bpr_z": _scores([0.95, 0.95], 0.2)}
    assert choose(weak) == "ape"
    # with label transfer the model's method is APE all voxels; without APE it is BPR z
    assert choose({**weak, "ape_all": _scores([0.4, 0.9], 0.05)}) == "body_box"
    assert choose({"body_box": weak["body_box"], "bpr_z": _scores([0.7, 0.9], 0.09)}) == "bpr_z"
    # one shot (nothing held out): the model's own box; APE x/y + BPR z kept half the organs with a CPU-trained BPR
    assert [default_method(True, True, True), default_method(True, True, False), default_method(False, True, False),
            default_method(False, False, False)] == ["ape_all", "ape", "bpr_z", "body_box"]


def test_with_many_shots_every_candidate_competes():
    from nnunet_ape.localize.choice import MANY_SHOTS

    scores = {"body_box": _scores([1.0, 0.998], 0.05), "ape": _scores([1.0, 0.999], 0.02),
              "ape_all": _scores([1.0, 0.998], 0.03), "bpr_z": _scores([1.0, 0.97], 0.01)}
    assert choose(scores, MANY_SHOTS - 1) == "ape_all"  # few shots: only the principal method (label transfer) competes
    assert choose(scores, MANY_SHOTS) == "ape"  # many: the smallest crop that kept as much as the body box
    scores["ape"]["recall_mean"] = 0.99  # kept less than the body box on the shots: out
    assert choose(scores, MANY_SHOTS) == "ape_all"
    scores["body_box"]["crop_fraction"] = 0.01
    assert choose(scores, 200) == "body_box"  # the body box is the smallest: no model replaces it


def test_shots_with_an_organ_of_another_size_are_named():
    from nnunet_ape.localize.fit import volume_outliers

    names = [f"s{i}" for i in range(8)]
    volumes = [25.0, 24.0, 26.0, 27.0, 23.0, 480.0, 2.0, 25.5]  # ml: a contour of another structure, a partial one
    assert [(n, round(r, 1)) for n, r in volume_outliers(names, volumes)] == [("s5", 19.0), ("s6", 0.1)]
    assert volume_outliers(names[:4], volumes[:3] + [480.0]) == []  # too few shots to tell


def test_relative_body_boxes_follow_the_body():
    body = np.array([[10.0, 20.0, 0.0], [50.0, 60.0, 99.0]])
    organ = np.array([[20.0, 30.0, 33.0], [30.0, 40.0, 66.0]])
    relative = relative_box(organ, body)
    assert np.allclose(box_in_body(relative, body), organ)
    moved = body + [5, -5, 10]
    assert np.allclose(box_in_body(relative, moved), organ + [5, -5, 10])
    masks = [np.zeros((60, 70, 100), bool) for _ in range(3)]
    for m, shift in zip(masks, (0, 2, 4)):
        m[20 + shift : 31 + shift, 30:41, 33:67] = True
    bodies = [body + [s, 0, 0] for s in (0, 2, 4)]
    assert np.allclose(mean_relative_box(masks, bodies), relative)  # the organ moves with the body: same place in it
    held = held_out_body_boxes(masks, bodies)
    assert len(held) == 3 and all(np.allclose(h, mask_box(m)) for h, m in zip(held, masks))
    assert held_out_body_boxes(masks[:1], bodies[:1]) == []


def test_fold_choice_prefers_ape_on_good_maps_and_the_body_box_on_useless_ones():
    # the organ is fixed in the image while the body moves: a perfect map (APE) finds it exactly, the body box does not
    shifts = (0, 3, -3, 2, -2, 1)
    good = [_case(f"g{i}", (15, 15, 15), body_shift=s) for i, s in enumerate(shifts)]
    result = evaluate_organ(good, value=1, shots=3)
    assert set(result["chosen"]) <= {"ape", "ape_all"}, result["chosen"]
    assert result["recall_calibrated_chosen"] >= 0.99
    assert result["vr_calibrated_chosen"] > result["vr_calibrated_body_box"]
    # the organ moves with the body and the maps say nothing (all zeros): the body box is exact, APE collapses
    flat = [_case(f"f{i}", (15 + s, 15, 15), body_shift=s) for i, s in enumerate(shifts)]
    for case in flat:
        case.embedding[:] = 0.0
    result = evaluate_organ(flat, value=1, shots=3)
    assert result["chosen"] == {"body_box": 2}
    assert result["recall_calibrated_chosen"] == result["recall_calibrated_body_box"] >= 0.99
    assert result["vr_calibrated_chosen"] > 5 * result["vr_calibrated_ape"]
    # each fold keeps its shots, the selection it chose on and every candidate's test crops (rules can be replayed)
    assert [f["shots"] for f in result["per_fold"]] == [["f0", "f1", "f2"], ["f3", "f4", "f5"]]
    for fold in result["per_fold"]:
        assert fold["chosen"] == "body_box" and set(fold["selection"]) == {"body_box", "ape", "ape_all"}
        assert fold["tests"]["chosen"] == fold["tests"]["body_box"] and fold["tests"]["body_box"]["recall"] >= 0.99
    quick = evaluate_organ(flat, value=1, shots=3, all_voxels=False)  # no label transfer: no all-voxels rows
    assert "iou_ape_all" not in quick and "recall_calibrated_ape_all" not in quick and quick["chosen"] == {"body_box": 2}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nnunet_ape", *args], capture_output=True, text=True)


@pytest.mark.skipif(not HEADNECK.exists(), reason="head-and-neck dataset not available")
def test_body_box_localizer_on_a_partially_contoured_real_dataset(tmp_path, capsys):
    """No model at all: per organ only the cases that contour it are shots, and the body box alone localizes."""
    labels = json.loads((HEADNECK / "dataset.json").read_text())["labels"]
    out = tmp_path / "body.json"
    fit = _cli("localize", "fit", "-d", str(HEADNECK), "--organs", "esophagus", "parotid_left", "--shots", "4", "-o", str(out))
    assert fit.returncode == 0, fit.stderr[-2000:]
    localizer = json.loads(out.read_text())
    assert localizer["method"] == "body" and "ape_checkpoint" not in localizer
    for organ in ("esophagus", "parotid_left"):
        entry = localizer["organs"][organ]
        assert len(entry["shot_cases"]) == 4 and entry["method"] == "body_box"
        for case in entry["shot_cases"]:  # every shot contours the organ
            assert (read_volume(HEADNECK / "labelsTr" / f"{case}.nii.gz").array == labels[organ]).any()
        assert entry["selection"]["body_box"]["reached"] in (True, False) and entry["body_box"]["alpha"] >= 1
        assert f"{organ}: 4 shot(s), method body_box" in fit.stdout
    # the esophagus is contoured in fewer cases than the parotid: its shots reach further into the data set
    assert localizer["organs"]["esophagus"]["shot_cases"] != localizer["organs"]["parotid_left"]["shot_cases"]
    assert set(localizer["shots"]) == {c for o in localizer["organs"].values() for c in o["shot_cases"]}
    # predict on a case that was no shot and contours both organs
    test = next(c for c in sorted(p.name[:-7] for p in (HEADNECK / "labelsTr").glob("*.nii.gz"))[60:]
                if {labels["esophagus"], labels["parotid_left"]} <= set(np.unique(read_volume(HEADNECK / "labelsTr" / f"{c}.nii.gz").array)))
    boxes_dir = tmp_path / "boxes"
    pred = _cli("localize", "predict", "-l", str(out), "-i", str(HEADNECK / "imagesTr" / f"{test}_0000.nii.gz"), "-o", str(boxes_dir))
    assert pred.returncode == 0, pred.stderr[-2000:]
    result = json.loads((boxes_dir / f"{test}_boxes.json").read_text())
    stamp = (boxes_dir / f"{test}_boxes.json").stat().st_mtime_ns
    # the rerun and the refusal below in-process: no interpreter start-up per call
    again, out_text, _ = cli_in_process(capsys, "localize", "predict", "-l", str(out), "-i",
                                        str(HEADNECK / "imagesTr" / f"{test}_0000.nii.gz"), "-o", str(boxes_dir))
    assert again == 0 and "1 of 1 box files exist already" in out_text
    assert (boxes_dir / f"{test}_boxes.json").stat().st_mtime_ns == stamp  # a restarted job skips finished cases
    label = read_volume(HEADNECK / "labelsTr" / f"{test}.nii.gz").array
    for organ in ("esophagus", "parotid_left"):
        entry = result["organs"][organ]
        assert entry["method"] == "body_box" and entry["crop_box_voxels"] == entry["body_box_voxels"]
        assert box_recall(label == labels[organ], np.array(entry["crop_box_voxels"])) > 0.8
        assert np.prod(np.diff(entry["crop_box_voxels"], axis=0) + 1) < 0.5 * label.size  # a crop, not the image
    lacking = next(c for c in sorted(p.name[:-7] for p in (HEADNECK / "labelsTr").glob("*.nii.gz"))
                   if labels["larynx"] not in np.unique(read_volume(HEADNECK / "labelsTr" / f"{c}.nii.gz").array))
    nowhere, _, err = cli_in_process(capsys, "localize", "fit", "--images", str(HEADNECK / "imagesTr" / f"{lacking}_0000.nii.gz"),
                                     "--labels", str(HEADNECK / "labelsTr" / f"{lacking}.nii.gz"), "--label-names",
                                     str(HEADNECK / "dataset.json"), "--organs", "larynx", "--shots", "1", "-o", str(tmp_path / "none.json"))
    assert nowhere == 2 and "contoured in none" in err and not (tmp_path / "none.json").exists()
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not HEADNECK.exists(), reason="head-and-neck dataset not available")
def test_a_method_the_models_cannot_give_is_a_one_line_error(tmp_path):
    out = tmp_path / "ape.json"
    result = _cli("localize", "fit", "-d", str(HEADNECK), "--organs", "mandible", "--shots", "2", "--method", "ape", "-o", str(out))
    assert result.returncode == 2 and "--method ape: not possible" in result.stderr and "body_box" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
    forced = _cli("localize", "fit", "-d", str(HEADNECK), "--organs", "mandible", "--shots", "2", "--method", "body_box", "-o", str(out))
    assert forced.returncode == 0, forced.stderr[-2000:]
    entry = json.loads(out.read_text())["organs"]["mandible"]
    assert entry["method"] == "body_box" and set(entry["selection"]) == {"body_box"}


@pytest.mark.skipif(not HEADNECK.exists(), reason="head-and-neck dataset not available")
def test_crop_dataset_leaves_out_training_cases_that_do_not_contour_the_organ(tmp_path, monkeypatch):
    """A body-box localizer (no model) and crop-dataset on 8 partially contoured real CTs: a case whose labels do not
    contour the larynx would teach nnU-Net that the larynx is background, so it is left out."""
    raw = tmp_path / "nnUNet_raw"
    source = raw / "Dataset901_HN"
    for sub in ("imagesTr", "labelsTr"):
        (source / sub).mkdir(parents=True)
    names = sorted(p.name[:-7] for p in (HEADNECK / "labelsTr").glob("*.nii.gz"))[:8]
    for name in names:
        (source / "imagesTr" / f"{name}_0000.nii.gz").symlink_to(HEADNECK / "imagesTr" / f"{name}_0000.nii.gz")
        (source / "labelsTr" / f"{name}.nii.gz").symlink_to(HEADNECK / "labelsTr" / f"{name}.nii.gz")
    dataset = json.loads((HEADNECK / "dataset.json").read_text())
    (source / "dataset.json").write_text(json.dumps({**dataset, "numTraining": len(names)}))
    larynx = dataset["labels"]["larynx"]
    contoured = [n for n in names if larynx in np.unique(read_volume(source / "labelsTr" / f"{n}.nii.gz").array)]
    assert 2 <= len(contoured) < len(names)  # the data set's partial contouring, in these 8 cases
    monkeypatch.setenv("nnUNet_raw", str(raw))
    localizer = tmp_path / "larynx.json"
    assert _cli("localize", "fit", "-d", str(source), "--organs", "larynx", "--shots", "2", "-o", str(localizer)).returncode == 0
    result = _cli("crop-dataset", "-d", str(source), "-l", str(localizer), "-o", "902")
    assert result.returncode == 0, result.stderr[-2000:]
    target = raw / "Dataset902_HNLarynxCrop"
    manifest = json.loads((target / "crops.json").read_text())
    assert sorted(c["case"] for c in manifest["cases"]) == contoured
    assert sorted(c["case"] for c in manifest["skipped_cases"]) == sorted(set(names) - set(contoured))
    assert all(c["skipped"] == "does not contour larynx" for c in manifest["skipped_cases"])
    assert json.loads((target / "dataset.json").read_text())["numTraining"] == len(contoured)
    assert sorted(p.name[:-7] for p in (target / "labelsTr").glob("*.nii.gz")) == contoured
    assert f"{len(names) - len(contoured)} training case(s) left out" in result.stdout
    for case in contoured:  # each crop holds the whole larynx (training boxes grow to their labels), as label 1
        crop_label = read_volume(target / "labelsTr" / f"{case}.nii.gz").array
        full = read_volume(source / "labelsTr" / f"{case}.nii.gz").array
        assert (crop_label == 1).sum() == (full == larynx).sum()


def test_preprocess_summary_warns_about_training_cases_that_do_not_contour_an_organ():
    """``nnunet-ape preprocess`` keeps every training case (nnU-Net's splits name them all); where a case's labels do
    not contour a chosen organ (the preprocessor records its fraction in the box as None), the summary lists the case
    and the terminal report warns."""
    from nnunet_ape.nnunet.crop_dataset import summary
    from nnunet_ape.nnunet.preprocess_runner import describe_run

    def record(case: str, fraction: float | None) -> dict:
        return {"case": case, "split": "train", "grown_mm": [[0.0] * 3, [0.0] * 3], "grown": False, "voxel_ratio": 8.0,
                "organ_fraction_in_predicted_box": {"larynx": fraction, "mandible": 0.97}}

    s = summary([record("hn_001", 0.99), record("hn_002", None), record("hn_003", None)])
    assert s["uncontoured"] == {"larynx": ["hn_002", "hn_003"]}
    assert s["organ_fraction_in_predicted_box"]["larynx"]["cases"] == 1
    text = describe_run("3d_fullres_ape", {**s, "median_preprocessed_shape": [40, 40, 40],
                                           "plan": {"patch_size": [32, 32, 32], "batch_size": 2}})
    assert "larynx is not contoured in 2 of 3 training case(s) (e.g. hn_002)" in text
    assert "mandible is not contoured" not in text
    assert "uncontoured" in summary([record("hn_001", 0.99)]) and not summary([record("hn_001", 0.99)])["uncontoured"]


def test_the_safety_net_joins_the_body_box_where_map_and_outline_disagree_beyond_the_shots():
    from nnunet_ape.localize.choice import safety_net, shot_agreement

    masks = [np.zeros((40, 40, 40), bool) for _ in range(3)]
    for m in masks:
        m[10:20, 10:20, 10:20] = True
    organ = np.array([[10, 10, 10], [19, 19, 19]], float)
    held = {"body_box": [organ.copy() for _ in masks], "ape_all": [organ + d for d in (0, 1, -1)]}
    alphas = {"body_box": 1.5, "ape_all": 1.2}
    agreement = shot_agreement(held, alphas, masks, "ape_all")
    assert 0.8 < agreement <= 1.0  # on the shots the map's crops lay (almost) inside the body box's
    # one shot of many where the map failed sets the lowest agreement, not the net's threshold (a low quantile)
    many = {"body_box": [organ.copy() for _ in range(40)], "ape_all": [organ + (15 if i == 0 else 0) for i in range(40)]}
    many_masks = [masks[0]] * 40
    assert shot_agreement(many, alphas, many_masks, "ape_all", quantile=0.0) < 0.2
    assert shot_agreement(many, alphas, many_masks, "ape_all") > 0.9
    assert shot_agreement(held, alphas, masks, "body_box") is None and shot_agreement(held, alphas, masks, "bpr_z") is None
    body_crop = np.array([[5, 5, 5], [24, 24, 24]], float)
    near = np.array([[6, 6, 6], [23, 23, 23]], float)
    kept, inside, used = safety_net(near, body_crop, agreement)
    assert not used and inside == 1.0 and np.array_equal(kept, near)
    far = np.array([[20, 20, 30], [30, 30, 39]], float)  # the map puts the organ elsewhere (a cut scan, a failed map)
    joined, inside, used = safety_net(far, body_crop, agreement)
    assert used and inside < 0.2
    assert np.array_equal(joined, [[5, 5, 5], [30, 30, 39]])  # both candidates kept
    assert safety_net(far, body_crop, None)[2] is False  # no agreement stored (body box chosen, one shot): no net
