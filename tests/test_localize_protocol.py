"""The localization protocol on synthetic cases whose answers are computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from nnunet_ape.localize.boxes import (
    alpha_for_recall,
    box_iou,
    box_recall,
    edge_points,
    enlarge_box,
    mask_box,
    volume_ratio,
)
from nnunet_ape.localize.fewshot import calibrate_alpha, combine_boxes, cut_sides, point_queries, predict_box, shot_queries
from nnunet_ape.localize.retrieval import nearest_voxels, outside_to_inf, radial_errors


def _position_map(shape, offset=(0, 0, 0)):
    """A perfect APE map: each voxel's embedding is its own (shifted) index."""
    return (np.indices(shape).transpose(1, 2, 3, 0) + np.asarray(offset)).astype(np.float32)


def test_iou_by_hand():
    a = np.array([[0, 0, 0], [9, 9, 9]], float)  # 1000 voxels
    b = np.array([[5, 0, 0], [14, 9, 9]], float)  # 1000 voxels, 500 shared
    assert box_iou(a, b) == pytest.approx(500 / 1500)
    assert box_iou(a, a) == 1.0
    assert box_iou(a, np.array([[20, 20, 20], [25, 25, 25]], float)) == 0.0


def test_recall_and_volume_ratio_by_hand():
    mask = np.zeros((20, 20, 20), bool)
    mask[5:15, 5:15, 5:15] = True
    assert box_recall(mask, np.array([[5, 5, 5], [14, 14, 14]], float)) == 1.0
    assert box_recall(mask, np.array([[5, 5, 5], [9, 14, 14]], float)) == pytest.approx(0.5)
    assert volume_ratio(mask.shape, np.array([[5, 5, 5], [14, 14, 14]], float)) == pytest.approx(8.0)


def test_edge_points_are_the_extremes_of_each_axis():
    mask = np.zeros((30, 30, 30), bool)
    mask[10:21, 12:15, 3:8] = True
    mask[15, 13, 25] = True  # a single voxel sticking out at the top
    points = edge_points(mask)
    assert points.shape == (6, 3)
    assert points[0, 0] == 10 and points[1, 0] == 20
    assert points[2, 1] == 12 and points[3, 1] == 14
    assert points[4, 2] == 3 and tuple(points[5]) == (15, 13, 25)
    assert all(mask[tuple(p)] for p in points)
    assert np.array_equal(mask_box(mask), np.array([[10, 12, 3], [20, 14, 25]]))


def test_alpha_for_recall_by_hand():
    mask = np.zeros((41, 41, 41), bool)
    mask[10:31, 10:31, 10:31] = True  # 21 voxels wide, centre 20
    small = np.array([[15, 15, 15], [25, 25, 25]], float)  # half-side 5, same centre
    alpha = alpha_for_recall(mask, small, target=1.0)
    # the crop is rounded outwards: half-side 5 * alpha must just exceed 9 to reach voxels 10 and 30
    assert alpha == pytest.approx(1.81, abs=0.005)
    assert box_recall(mask, enlarge_box(small, alpha, mask.shape)) == 1.0
    assert box_recall(mask, enlarge_box(small, alpha - 0.05, mask.shape)) < 1.0


def test_nearest_voxels_is_exact_and_chunk_independent():
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(37, 23, 11, 3)).astype(np.float32)  # not divisible by the block sizes
    queries = rng.normal(size=(25, 3))
    flat = embedding.reshape(-1, 3)
    brute = np.argmin(((flat[:, None, :] - queries[None]) ** 2).sum(-1), axis=0)
    expected = np.stack(np.unravel_index(brute, embedding.shape[:3]), axis=1)
    for block in (1, 4, 8, 16):  # from no pruning to blocks larger than the map along z (padding)
        assert np.array_equal(nearest_voxels(queries, embedding, block=block), expected)
    smooth = np.indices((37, 23, 11)).transpose(1, 2, 3, 0).astype(np.float32) * 0.5  # like a real APE map
    flat = smooth.reshape(-1, 3)
    queries = flat[rng.integers(0, len(flat), 10)] + rng.normal(0, 0.1, (10, 3))
    brute = np.argmin(((flat[:, None, :] - queries[None]) ** 2).sum(-1), axis=0)
    assert np.array_equal(nearest_voxels(queries, smooth), np.stack(np.unravel_index(brute, smooth.shape[:3]), axis=1))


def test_nearest_voxels_never_answers_outside_the_search_region():
    rng = np.random.default_rng(1)
    embedding = rng.normal(size=(37, 23, 11, 3)).astype(np.float32)
    region = np.zeros((37, 23, 11), bool)
    region[5:30, 4:20, 2:9] = True
    region[0, 0, 0] = True  # a lone searchable voxel in an otherwise excluded block
    queries = np.concatenate([embedding[~region][:10], rng.normal(size=(15, 3))])  # 10 exact matches outside
    searchable = outside_to_inf(embedding, region)
    assert np.isfinite(embedding).all()  # the caller's map is untouched
    inside = np.argwhere(region)
    values = embedding[region]
    brute = inside[np.argmin(((values[:, None, :] - queries[None]) ** 2).sum(-1), axis=0)]
    for block in (1, 4, 8, 16):
        found = nearest_voxels(queries, searchable, block=block)
        assert region[tuple(found.T)].all()
        assert np.array_equal(found, brute)
    with pytest.raises(ValueError, match="no finite"):
        nearest_voxels(queries, outside_to_inf(embedding, np.zeros(region.shape, bool)))


def test_queries_outside_the_search_region_come_from_the_nearest_searchable_organ_voxel():
    embedding = _position_map((20, 20, 20))
    mask = np.zeros((20, 20, 20), bool)
    mask[5:10, 5:10, 5:10] = True
    region = np.ones(mask.shape, bool)
    region[5, :, :] = False  # the organ's x-min face lies outside the region
    searchable = outside_to_inf(embedding, region)
    queries = shot_queries(searchable, mask)
    assert np.isfinite(queries).all()
    assert queries[0, 0] == 6  # the x-min edge point moved one voxel inwards, into the region
    assert np.array_equal(queries[1:], shot_queries(embedding, mask)[1:])
    assert np.array_equal(point_queries(searchable, np.array([[7, 7, 7]]), mask), [[7, 7, 7]])


def test_perfect_map_retrieves_exact_boxes_and_radial_errors_are_zero():
    shape = (40, 40, 40)
    train = _position_map(shape)
    test = _position_map(shape)  # the same "anatomy" at the same place
    mask = np.zeros(shape, bool)
    mask[8:20, 10:30, 5:12] = True
    edges = [shot_queries(train, mask)]
    box, per_shot = predict_box(edges, test)
    assert np.array_equal(box, mask_box(mask)) and len(per_shot) == 1
    assert box_iou(box, mask_box(mask)) == 1.0
    found = nearest_voxels(edges[0], test)
    assert radial_errors(found * 2.0, edge_points(mask) * 2.0).max() == 0.0


def test_shifted_anatomy_is_found_where_it_is():
    shape = (40, 40, 40)
    test = _position_map(shape, offset=(-5, 3, 0))  # the patient lies 5 voxels further along x, 3 less along y
    mask = np.zeros(shape, bool)
    mask[8:20, 10:30, 5:12] = True
    box, _ = predict_box([shot_queries(_position_map(shape), mask)], test)
    assert np.array_equal(box, mask_box(mask) + np.array([5, -3, 0]))


def test_combining_shots_mean_and_robust_median():
    boxes = [np.array([[0, 0, 0], [10, 10, 10]], float)] * 2 + [np.array([[30, 30, 30], [40, 40, 40]], float)]
    assert np.allclose(combine_boxes(boxes, "mean"), [[10] * 3, [20] * 3])
    assert np.allclose(combine_boxes(boxes, "median"), [[0] * 3, [10] * 3])  # the stray shot is ignored


def test_leave_one_shot_out_alpha_reaches_the_target_on_every_shot():
    shape = (50, 50, 50)
    maps, masks = [], []
    for size in (8, 10, 12):  # the organ grows from shot to shot, centred at 25
        mask = np.zeros(shape, bool)
        mask[25 - size : 25 + size, 25 - size : 25 + size, 25 - size : 25 + size] = True
        maps.append(_position_map(shape))
        masks.append(mask)
    edges = [shot_queries(m, k) for m, k in zip(maps, masks)]
    alpha = calibrate_alpha(edges, maps, masks, target=0.99)
    assert alpha > 1.0
    for held in range(3):
        others = [e for i, e in enumerate(edges) if i != held]
        box, _ = predict_box(others, maps[held])
        assert box_recall(masks[held], enlarge_box(box, alpha, shape)) >= 0.99


def test_an_organ_cut_by_the_scan_reaches_the_test_border_on_the_cut_side():
    shape = (40, 40, 40)
    mask = np.zeros(shape, bool)
    mask[8:20, 10:30, 25:40] = True  # touches the last slice: the scan cut it at the top
    assert cut_sides(mask).tolist() == [[False] * 3, [False, False, True]]
    test = _position_map(shape, offset=(0, 0, -10))  # the test scan shows 10 more slices above the same anatomy
    # the test's organ goes on beyond the shot's field of view: every cut side reaches the test border
    box, per_shot = predict_box([shot_queries(_position_map(shape), mask)], test, cuts=[cut_sides(mask)])
    assert box.tolist() == [[8, 10, 35], [19, 29, 39]]
    assert per_shot[0].tolist() == box.tolist()
    test = _position_map(shape, offset=(0, 0, 5))  # the test shows 5 more slices below, 5 fewer above
    box, _ = predict_box([shot_queries(_position_map(shape), mask)], test, cuts=[cut_sides(mask)])
    assert box.tolist() == [[8, 10, 20], [19, 29, 39]]


def test_cut_sides_come_from_the_shots_that_show_them():
    shape = (40, 40, 40)
    whole = np.zeros(shape, bool)
    whole[8:20, 10:30, 10:30] = True
    cut = whole.copy()
    cut[:, :, :15] = False  # a second shot whose scan starts inside the organ
    cut = np.roll(cut, -15, axis=2)  # ...so the organ touches its first slice
    assert cut_sides(cut)[0, 2] and not cut_sides(whole).any()
    maps = [_position_map(shape), _position_map(shape, offset=(0, 0, 15))]
    edges = [shot_queries(m, k) for m, k in zip(maps, [whole, cut])]
    cuts = [cut_sides(whole), cut_sides(cut)]
    for how in ("mean", "median"):
        box, _ = predict_box(edges, _position_map(shape), how, cuts)
        # both shots agree on the top (29) and on x/y; only the whole shot knows the bottom (10)
        assert box.tolist() == [[8, 10, 10], [19, 29, 29]], how
    mean_uncut, _ = predict_box(edges, _position_map(shape), "mean")
    assert mean_uncut[0, 2] == 12.5  # the cut shot drags the bottom up by half its 15-slice cut


def test_sides_known_to_different_shots_never_cross():
    """Shot A shows only the organ's bottom (its scan cut the top), shot B only its top, and they disagree: A's
    bottom (z 25) lies above B's top (z 9). Side by side that is an inverted box (no volume, no recall at any
    enlargement); instead the axis comes from the shots' whole boxes, the cut sides at the test's border."""
    shape = (40, 40, 40)
    top_cut, bottom_cut = np.zeros(shape, bool), np.zeros(shape, bool)
    top_cut[8:20, 10:30, 25:40] = True
    bottom_cut[8:20, 10:30, 0:10] = True
    edges = [shot_queries(_position_map(shape), m) for m in (top_cut, bottom_cut)]
    cuts = [cut_sides(top_cut), cut_sides(bottom_cut)]
    for how in ("mean", "median"):
        box, per_shot = predict_box(edges, _position_map(shape), how, cuts)
        assert [b[:, 2].tolist() for b in per_shot] == [[25, 39], [0, 9]]
        assert box.tolist() == [[8, 10, 12.5], [19, 29, 24]], how  # z: mean of [25, 39] and [0, 9]
        assert alpha_for_recall(top_cut | bottom_cut, box, 1.0) < 4  # an enlarged box reaches the whole organ


def test_the_calibrated_alpha_is_a_conformal_quantile_of_the_shots():
    from nnunet_ape.localize.boxes import calibrated_alpha

    few = [1.2, 1.5, 1.1, 1.9, 1.3]
    assert calibrated_alpha(few, 1.5) == (1.9, pytest.approx(5 / 6))  # below 99 shots: the largest, covering n/(n+1)
    many = list(np.linspace(1.0, 3.0, 299))
    alpha, coverage = calibrated_alpha(many, 1.5)
    assert alpha == pytest.approx(many[296]) and alpha < max(many)  # rank ceil(300 * 0.99) = 297 of 299
    assert coverage == pytest.approx(297 / 300) and coverage >= 0.99
    assert calibrated_alpha([], 1.5) == (1.5, None)
    rng = np.random.default_rng(0)  # the promise: a new exchangeable case needs no more in >= 99% of draws
    hits = [rng.random() <= calibrated_alpha(list(rng.random(199)), 1.0)[0] for _ in range(4000)]
    assert np.mean(hits) >= 0.985


def test_trimmed_combination_leaves_out_the_extreme_shots_per_side():
    from nnunet_ape.cli import common
    from nnunet_ape.localize import fewshot

    assert common.COMBINE_CHOICES == fewshot.COMBINE and common.DEFAULT_COMBINE == fewshot.DEFAULT_COMBINE
    low = [0.0, 1.0, 2.0, 3.0, 40.0]  # five shots' low x side; one stray shot at 40
    boxes = [np.array([[x, 0, 0], [x + 10, 10, 10]]) for x in low]
    assert combine_boxes(boxes, "trimmed")[0, 0] == pytest.approx(2.0)  # mean of 1, 2, 3
    assert combine_boxes(boxes, "mean")[0, 0] == pytest.approx(9.2)
    assert combine_boxes(boxes[:2], "trimmed")[0, 0] == pytest.approx(0.5)  # two shots: nothing to leave out
    # four shots: nothing is left out, and the result is the mean bit for bit (a sorted sum, as a trimmed mean takes
    # it, differs from it in the last bits for most real-valued boxes)
    four = list(np.random.default_rng(0).normal(50.0, 30.0, (4, 2, 3)))
    assert np.array_equal(combine_boxes(four, "trimmed"), combine_boxes(four, "mean"))
    sides = [b.copy() for b in boxes]
    for box, top in zip(sides, (np.nan, 10.0, 11.0, 12.0, 50.0)):
        box[1, 2] = top  # the first shot cannot tell the top: the other four are combined (4 shots: none trimmed)
    assert fewshot._combine_sides(sides, "trimmed")[1, 2] == pytest.approx(20.75)
    assert fewshot._combine_sides(sides, "median")[1, 2] == pytest.approx(11.5)
    assert fewshot._combine_sides(sides, "trimmed")[0, 0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown combination"):
        combine_boxes(boxes, "mode")
