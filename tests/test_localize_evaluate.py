"""The evaluation protocol: known answers on perfect position maps, and the command on phantoms."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nnunet_ape.io import Volume
from nnunet_ape.localize.evaluate import PreparedCase, body_box, evaluate_organ, markdown_tables, mean_over_organs


def _case(name: str, organ_lo: tuple[int, int, int], body_shift: int = 0) -> PreparedCase:
    """A 40^3 case whose APE map is each voxel's true position (a perfect model); organ value 1 is a 5x7x5 block (integer centre)."""
    shape = (40, 40, 40)
    ct = Volume(np.full(shape, -1000, np.int16), (2.0, 2.0, 2.0))
    ct.array[5 + body_shift : 35 + body_shift, 5:35, 5:35] = 40
    label = np.zeros(shape, np.int64)
    x, y, z = organ_lo
    label[x : x + 5, y : y + 7, z : z + 5] = 1
    embedding = (np.indices(shape).transpose(1, 2, 3, 0) * 2.0).astype(np.float32)  # mm
    return PreparedCase(name, ct, embedding, label, body_box(ct.array))


def test_perfect_maps_give_zero_error_full_iou_and_no_enlargement():
    cases = [_case(f"c{i}", (10 + i, 12, 14 + i)) for i in range(4)]
    result = evaluate_organ(cases, value=1, shots=2)
    assert result["evaluated"] == 4 and result["folds"] == 2  # 2 folds x 2 test cases
    # the map says where each voxel is, but shots and tests differ in where the organ is: retrieval finds the
    # shot's centre voxel (rounded centre of mass) at the same place in the test image, so the error is the
    # distance from there to the test organ's true centre of mass
    def centre(i):
        return np.array([10 + i + 2.0, 12 + 3.0, 14 + i + 2.0])

    errors = [np.linalg.norm((np.round(centre(i)) - centre(j)) * 2.0) for i in range(4) for j in range(4) if i // 2 != j // 2]
    assert result["mre_c"][0] == pytest.approx(np.mean(errors), abs=1e-6)
    assert 0 < result["iou_ape"] < 1


def test_identical_cases_are_localized_exactly():
    cases = [_case(f"c{i}", (10, 12, 14)) for i in range(3)]
    result = evaluate_organ(cases, value=1, shots=1)
    assert result["mre_c"] == [0.0, 0.0] and result["mre_ep"] == [0.0, 0.0]
    assert result["iou_ape"] == 1.0 and result["iou_body_box"] == 1.0
    assert result["recall_calibrated_ape"] == 1.0


def test_body_box_baseline_follows_the_body_and_ape_follows_the_anatomy():
    # the organ sits at a fixed place in the image, but the body moves: the baseline moves with the body and misses
    cases = [_case(f"c{i}", (15, 15, 15), body_shift=(0, 3, -3, 2)[i]) for i in range(4)]
    result = evaluate_organ(cases, value=1, shots=1)
    assert result["iou_ape"] == 1.0
    assert result["iou_body_box"] < 0.9
    assert result["vr99_ape"] >= result["vr99_body_box"]


def test_a_collapsed_box_still_reaches_vr99_by_covering_the_image():
    # a map that is the same everywhere retrieves one voxel for every query: the box collapses to a point. It counts
    # as one voxel when enlarged, so some alpha always reaches 99 % recall (at worst the one that covers the whole
    # image): VR@99 is then defined, and small, saying honestly how little such a crop saves
    good, flat = _case("good", (10, 12, 14)), _case("flat", (10, 12, 14))
    flat.embedding[:] = 0.0
    collapsed = evaluate_organ([good, flat], value=1, shots=1)
    assert collapsed["iou_ape"] == 0.0
    assert np.isfinite(collapsed["vr99_ape"]) and collapsed["vr99_ape"] >= 1.0
    assert collapsed["alpha99_ape"] > 20  # beyond the old 20x cap, which left this case undefined
    exact = evaluate_organ([_case(f"c{i}", (10, 12, 14)) for i in range(2)], value=1, shots=1)
    assert collapsed["vr99_body_box"] == pytest.approx(exact["vr99_body_box"])  # the baseline does not use the map
    assert exact["vr99_ape"] > 10 * collapsed["vr99_ape"]
    mean = mean_over_organs({"a": collapsed, "b": exact})
    assert mean["vr99_ape"] == pytest.approx((collapsed["vr99_ape"] + exact["vr99_ape"]) / 2)
    assert mean["iou_ape"] == pytest.approx(0.5)


def test_flat_boxes_grow_when_enlarged():
    from nnunet_ape.localize.boxes import alpha_for_recall, covering_alpha, enlarge_box

    point = np.array([[5.0, 5.0, 5.0], [5.0, 5.0, 5.0]])
    assert np.allclose(enlarge_box(point, 4.0), [[3, 3, 3], [7, 7, 7]])  # half-extent 0.5 voxel x 4
    slab = np.array([[2.0, 2.0, 5.0], [8.0, 8.0, 5.0]])  # one slice thick
    assert np.allclose(enlarge_box(slab, 2.0), [[-1, -1, 4], [11, 11, 6]])
    assert np.allclose(enlarge_box(slab, 2.0, (20, 20, 20))[0], [0, 0, 4])
    shape = (20, 20, 20)
    assert np.allclose(enlarge_box(point, covering_alpha(point, shape), shape), [[0, 0, 0], [19, 19, 19]])
    mask = np.zeros(shape, bool)
    mask[15:18, 15:18, 15:18] = True  # far from the point
    alpha = alpha_for_recall(mask, point, 0.99)
    assert 20 < alpha <= covering_alpha(point, shape) + 0.01
    assert alpha_for_recall(mask, point, 0.99, max_alpha=5.0) == 5.0  # an explicit cap still applies


def test_organs_missing_from_cases_are_left_out_and_reported():
    cases = [_case(f"c{i}", (10, 12, 14)) for i in range(3)]
    cases[1].label[:] = 0
    result = evaluate_organ(cases, value=1, shots=1)
    assert result["cases"] == 2 and result["evaluated"] == 2  # 2 folds of 1 shot, each tested on the other case
    table = markdown_tables({"organs": {"thing": result, "absent": evaluate_organ(cases, 7, 1)}, "mean": {},
                             "settings": {"shots": 1, "cases": 3, "target_recall": 0.99}})
    assert "| thing | 2 |" in table and "too few cases" in table


def test_evaluate_command_on_phantoms(pretrained_run, bpr_run, tmp_path):
    from nnunet_ape.cli import main
    from nnunet_ape.phantoms import write_cohort

    write_cohort(tmp_path / "cohort", 4, seed=3)
    out = tmp_path / "eval"
    code = main(["evaluate", "localization", "-m", str(pretrained_run / "checkpoint_final.pt"), "-d", str(tmp_path / "cohort"),
                 "--bpr-model", str(bpr_run / "checkpoint_final.pt"),
                 "--organs", "liver", "aorta", "spine", "--shots", "2", "-o", str(out), "--device", "cpu"])
    assert code == 0
    result = json.loads((out / "localization.json").read_text())
    assert set(result["organs"]) == {"liver", "aorta", "spine"}
    spine = result["organs"]["spine"]  # the spine is in every phantom
    assert spine["evaluated"] == 4
    for key in ("mre_c", "mre_ep", "iou_ape", "iou_body_box", "vr99_ape", "vr99_body_box", "iou_bpr_z", "iou_ape_bpr",
                "recall_calibrated_bpr_z", "vr_calibrated_ape_bpr"):
        assert key in spine, key
    assert 0 <= spine["iou_ape"] <= 1 and spine["vr99_ape"] >= 1
    assert 0 <= spine["iou_bpr_z"] <= 1 and 0 <= spine["recall_calibrated_bpr_z"] <= 1
    # same crops along z, but APE x/y on top: never a larger volume than the BPR z-only crop
    assert spine["vr_calibrated_ape_bpr"] >= spine["vr_calibrated_bpr_z"]
    table = (out / "localization.md").read_text()
    assert "IoU body box" in table and "IoU BPR z" in table and "IoU APE x/y + BPR z" in table
