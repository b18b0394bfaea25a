"""BPR z-localization: known answers on synthetic scores, the protocol's BPR rows, and fit/predict on real CT."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import labeled_patient
from nnunet_ape.io import Volume, read_volume, to_canonical
from nnunet_ape.localize.evaluate import PreparedCase, body_box, evaluate_organ, markdown_tables
from nnunet_ape.localize.zrange import (
    DEFAULT_MARGIN_MM,
    ScoredCT,
    calibrate_margin,
    combine_intervals,
    margin_for_recall,
    organ_interval,
    z_range,
    z_recall,
)


def _mask(z_lo: int, z_hi: int, n: int = 40) -> np.ndarray:
    mask = np.zeros((4, 4, n), bool)
    mask[1:3, 1:3, z_lo : z_hi + 1] = True
    return mask


def test_interval_range_and_recall_by_hand():
    scores = np.arange(40) * 2.0  # score = 2 per slice
    assert organ_interval(scores, _mask(10, 20)).tolist() == [20.0, 40.0]
    assert z_range(scores, np.array([20.0, 40.0])) == (10, 20)
    assert z_range(scores, np.array([20.0, 40.0]), margin=4.0) == (8, 22)
    assert z_range(scores, np.array([200.0, 210.0])) == (39, 39)  # outside the scan: the nearest slice
    assert z_recall(_mask(10, 19), 10, 14) == pytest.approx(0.5)
    assert combine_intervals([np.array([0.0, 10.0]), np.array([2.0, 14.0]), np.array([100.0, 200.0])], "median").tolist() == [2.0, 14.0]


def test_slices_without_a_score_never_collapse_a_z_range():
    # Seen on the head-and-neck cohort: a spinal cord reaching the scan's last slice, which has no body and so no
    # score, gave a NaN interval end, and every z-range of that organ collapsed to one slice (recall 0.01).
    scores = np.arange(40) * 2.0
    scores[:3] = np.nan
    assert organ_interval(scores, _mask(0, 20)).tolist() == [6.0, 40.0]  # the organ's lowest slice with a score
    assert np.isnan(organ_interval(scores, _mask(0, 2))).all()
    intervals = [np.array([6.0, 40.0]), np.array([np.nan, np.nan]), np.array([10.0, 44.0])]
    assert combine_intervals(intervals, "mean").tolist() == [8.0, 42.0]  # the shots that have one
    assert np.isnan(combine_intervals(intervals[1:2], "median")).all()
    assert z_range(scores, np.array([np.nan, np.nan])) == (0, 39)  # nothing to place by: the whole scan, no cut
    assert margin_for_recall(_mask(0, 2), scores, np.array([np.nan, np.nan])) == 0.0


def test_margin_reaches_the_target_recall():
    scores = np.arange(40) * 2.0
    mask = _mask(8, 22)  # the organ reaches 2 slices further than the interval on both sides
    margin = margin_for_recall(mask, scores, np.array([20.0, 40.0]), target=0.99)
    assert 4.0 <= margin <= 4.01 and z_recall(mask, *z_range(scores, np.array([20.0, 40.0]), margin)) == 1.0
    # leave-one-shot-out over two shots whose organs sit 3 slices apart: each needs 3 slices (6 score units)
    scored = [ScoredCT(scores, 2.0 / 3.0), ScoredCT(scores, 2.0 / 3.0)]
    masks = [_mask(10, 20), _mask(13, 23)]
    intervals = [organ_interval(scores, m) for m in masks]
    assert calibrate_margin(intervals, scored, masks) == pytest.approx(6.0, abs=0.01)
    # one shot: the default margin in mm, converted with the shot's slope (score units per mm)
    assert calibrate_margin(intervals[:1], scored[:1], masks[:1]) == pytest.approx(DEFAULT_MARGIN_MM * 2.0 / 3.0)


def _case(name: str, organ_z: int, body_z_shift: int = 0) -> PreparedCase:
    """A 40^3 case with a perfect APE map (true position) and perfect BPR scores (anatomical height = slice index
    minus the body's shift); organ 1 is a 6x6x8 block."""
    shape = (40, 40, 40)
    ct = Volume(np.full(shape, -1000, np.int16), (2.0, 2.0, 2.0))
    ct.array[5:35, 5:35, :] = 40
    label = np.zeros(shape, np.int64)
    label[10:16, 12:18, organ_z : organ_z + 8] = 1
    embedding = (np.indices(shape).transpose(1, 2, 3, 0) * 2.0).astype(np.float32)
    scores = (np.arange(40) - body_z_shift).astype(float)
    return PreparedCase(name, ct, embedding, label, body_box(ct.array), ScoredCT(scores, 0.5))


def test_protocol_bpr_rows_with_perfect_scores():
    # the organ moves with the anatomy (scores), so BPR z-ranges are exact; its x/y never changes
    cases = [_case(f"c{i}", 12 + s, body_z_shift=s) for i, s in enumerate((0, 3, -2, 5))]
    result = evaluate_organ(cases, value=1, shots=2)
    assert result["recall_calibrated_bpr_z"] == 1.0 and result["recall_calibrated_ape_bpr"] == 1.0
    # z exact, x/y the full image: IoU = organ area / image area in x/y
    assert result["iou_bpr_z"] == pytest.approx(36 / 1600)
    assert result["vr_calibrated_ape_bpr"] >= result["vr_calibrated_bpr_z"]
    table = markdown_tables({"organs": {"block": result}, "mean": {}, "settings": {
        "shots": 2, "cases": 4, "target_recall": 0.99, "methods": ["ape", "body_box", "bpr_z", "ape_bpr"]}})
    assert "IoU APE x/y + BPR z" in table and "recall BPR z" in table


@pytest.fixture(scope="module")
def bpr_localizer(bpr_run, tmp_path_factory):
    """A BPR-only localizer fitted on patient A (liver, spleen, stomach, kidneys)."""
    from nnunet_ape.cli import main

    case = labeled_patient("A")
    folder = tmp_path_factory.mktemp("shots")
    (folder / "images").mkdir(), (folder / "labels").mkdir()
    (folder / "images" / "A.nii.gz").symlink_to(case.image)
    (folder / "labels" / "A.nii.gz").symlink_to(case.label)
    out = folder / "bpr_localizer.json"
    assert main(["localize", "fit", "--bpr-model", str(bpr_run / "checkpoint_final.pt"), "--images", str(folder / "images"),
                 "--labels", str(folder / "labels"), "--label-names", str(case.label.parent / "ts_a_labels.json"),
                 "--organs", "liver", "spleen", "stomach", "kidney_left", "--shots", "1", "-o", str(out), "--device", "cpu"]) == 0
    return out


def test_bpr_localizer_file_is_readable(bpr_localizer):
    localizer = json.loads(bpr_localizer.read_text())
    assert localizer["method"] == "bpr" and "ape_checkpoint" not in localizer and len(localizer["bpr_sha256"]) == 64
    liver = localizer["organs"]["liver"]["bpr"]
    assert liver["intervals"][0][0] < liver["intervals"][0][1] and liver["margin"] > 0


def test_bpr_z_ranges_on_a_shifted_field_of_view_of_the_same_patient(bpr_localizer, tmp_path):
    """Patient A cropped in z (a different field of view): BPR z-ranges must still hold each organ's slices."""
    from nnunet_ape.cli import main
    from nnunet_ape.io import write_volume

    case = labeled_patient("A")
    ct, label = read_volume(case.image), read_volume(case.label).array
    keep = slice(15, 112)
    cropped = Volume(ct.array[:, :, keep], ct.spacing, tuple(ct.index_to_physical(np.array([[0, 0, keep.start]]))[0]), ct.direction)
    image = write_volume(cropped, tmp_path / "a_cropped.nii.gz")
    out = tmp_path / "boxes"
    assert main(["localize", "predict", "-l", str(bpr_localizer), "-i", str(image), "-o", str(out), "--png", "--device", "cpu"]) == 0
    boxes = json.loads((out / "a_cropped_boxes.json").read_text())["organs"]
    names = {v: k for k, v in case.labels.items()}
    for organ, entry in boxes.items():
        mask = label[:, :, keep] == case.labels[organ]
        low, high = entry["bpr_z_range"]
        box = np.asarray(entry["crop_box_voxels"])
        assert box[0, 0] == 0 and box[1, 0] == cropped.shape[0] - 1  # full x/y
        assert 0 <= box[0, 2] <= box[1, 2] <= cropped.shape[2] - 1
        canon_mask = to_canonical(cropped.with_array(mask))[0].array
        recall = canon_mask[:, :, low : high + 1].sum() / canon_mask.sum()
        print(f"{organ} ({names[case.labels[organ]]}): z-range {low}-{high}, recall {recall:.3f}")
        assert recall >= 0.95
    assert (out / "a_cropped_boxes.png").exists()


def test_evaluate_bpr_compares_models_on_real_ct(bpr_run, tmp_path):
    """Patient A, A with a different field of view and A resampled to 2 mm: a trained model finds the landmark
    slices of one in the others; a random-weight model of the same trunk, in the same table, does not."""
    import torch

    from nnunet_ape.case_variants import write_case_variants
    from nnunet_ape.checkpoint import save_atomic
    from nnunet_ape.cli import main
    from nnunet_ape.models.bpr import BPRNet

    case = labeled_patient("A")
    images, labels = write_case_variants(case, tmp_path / "cases")
    assert sorted(p.name for p in images.iterdir()) == ["A.nii.gz", "A_2mm.nii.gz", "A_fov.nii.gz"]
    torch.manual_seed(0)
    random = save_atomic({"format": "nnunet-ape/bpr-v1", "model_config": {"trunk": "tiny"}, "model": BPRNet("tiny").state_dict(),
                          "iteration": 0}, tmp_path / "random.pt")
    out = tmp_path / "eval"
    assert main(["evaluate", "bpr", "--bpr-model", str(bpr_run / "checkpoint_final.pt"), str(random), "--images", str(images),
                 "--labels", str(labels), "--label-names", str(case.label.parent / "ts_a_labels.json"), "-o", str(out),
                 "--device", "cpu"]) == 0
    result = json.loads((out / "bpr_evaluation.json").read_text())
    trained, untrained = result["models"].values()
    print((out / "bpr_evaluation.md").read_text())
    assert trained["pairs"] >= 20 and {"L3", "kidneys_top", "liver_bottom"} <= set(trained["landmarks"])
    assert trained["mae_mm"] < 10.0 and trained["mae_mm"] < untrained["mae_mm"]
    assert trained["spearman"] > 0.9 > untrained["spearman"]
    assert "| landmark |" in (out / "bpr_evaluation.md").read_text()
