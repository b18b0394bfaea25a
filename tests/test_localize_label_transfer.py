"""All-voxels label transfer on synthetic maps whose answers are computed by hand.

The maps are "perfect" embeddings: a voxel's embedding is its own index (plus a shift on the test map), so the
nearest shot sample of a test voxel is known exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from nnunet_ape.localize.boxes import alpha_for_recall
from nnunet_ape.localize.label_transfer import (
    LabelSamples,
    LabelTransfer,
    body_grid,
    calibrate_transfer_alpha,
    held_out_boxes,
)

SHAPE = (40, 30, 20)
WHOLE = np.array([[0, 0, 0], [39, 29, 19]], dtype=float)


def index_map(shift=(0, 0, 0)) -> np.ndarray:
    """Embedding ``(X, Y, Z, 3)`` = voxel index + shift."""
    return (np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1) + np.asarray(shift)).astype(np.float32)


def organ_label(lo=(10, 5, 3), hi=(19, 14, 8), value=3) -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = value
    return label


def test_the_box_moves_with_the_anatomy_on_the_test_map():
    """Test voxel v carries embedding v + d, so it is the shot's voxel v + d: the organ box is the shot's minus d."""
    grid = body_grid(WHOLE, (4.0, 4.0, 4.0), SHAPE)  # 4 mm voxels: every voxel is a grid point
    transfer = LabelTransfer(LabelSamples.from_shot(index_map(), organ_label(), grid), k=1)
    d = np.array([3, -2, 1])
    box = transfer.neighbours(index_map(d), grid).organ_box(3)
    np.testing.assert_array_equal(box, [[10 - 3, 5 + 2, 3 - 1], [19 - 3, 14 + 2, 8 - 1]])


def test_a_stray_voxel_of_the_label_does_not_stretch_the_box():
    label = organ_label()
    label[35, 25, 17] = 3  # far from the organ: its own connected component
    grid = body_grid(WHOLE, (4.0, 4.0, 4.0), SHAPE)
    box = LabelTransfer(LabelSamples.from_shot(index_map(), label, grid), k=1).neighbours(index_map(), grid).organ_box(3)
    np.testing.assert_array_equal(box, [[10, 5, 3], [19, 14, 8]])


def test_a_coarse_grid_boxes_whole_cells_at_full_resolution():
    """1 mm voxels and a 4 mm step: grid points every 4 voxels from the body box's corner; a cell found by the
    transfer spans its 4 voxels."""
    grid = body_grid(WHOLE, (1.0, 1.0, 1.0), SHAPE)
    np.testing.assert_array_equal(grid.stride, [4, 4, 4])
    assert grid.dims == (10, 8, 5)
    label = organ_label(lo=(8, 4, 4), hi=(15, 11, 11))  # grid points 8, 12 / 4, 8 / 4, 8 inside
    box = LabelTransfer(LabelSamples.from_shot(index_map(), label, grid), k=1).neighbours(index_map(), grid).organ_box(3)
    np.testing.assert_array_equal(box, [[8, 4, 4], [15, 11, 11]])


def test_threshold_is_the_fraction_of_neighbours_with_the_label():
    """k = 3 along a line: a test voxel's neighbours are itself and the samples on either side, so with threshold
    0.5 the box is the organ (the voxels just outside have 1 of 3 neighbours in it), with 0.3 one voxel more per side."""
    shape = (30, 1, 1)
    emb = np.arange(30, dtype=np.float32)[:, None, None, None] * np.array([1, 0, 0], np.float32)
    label = np.zeros(shape, np.uint8)
    label[10:20] = 1
    grid = body_grid(np.array([[0, 0, 0], [29, 0, 0]], float), (4.0, 4.0, 4.0), shape)
    neighbours = LabelTransfer(LabelSamples.from_shot(emb, label, grid), k=3).neighbours(emb, grid)
    np.testing.assert_array_equal(neighbours.organ_box(1, 0.5)[:, 0], [10, 19])
    np.testing.assert_array_equal(neighbours.organ_box(1, 0.3)[:, 0], [9, 20])


def test_an_organ_no_neighbour_carries_has_no_box_and_other_labels_can_be_dropped():
    grid = body_grid(WHOLE, (4.0, 4.0, 4.0), SHAPE)
    label = organ_label(value=3) + organ_label(lo=(25, 20, 12), hi=(30, 25, 15), value=5)
    samples = LabelSamples.from_shot(index_map(), label, grid, keep=[3])
    assert set(np.unique(samples.labels)) == {0, 3}
    assert LabelTransfer(samples, k=1).neighbours(index_map(), grid).organ_box(5) is None


def test_pooling_thins_reproducibly():
    grid = body_grid(WHOLE, (4.0, 4.0, 4.0), SHAPE)
    part = LabelSamples.from_shot(index_map(), organ_label(), grid)
    a = LabelSamples.pooled([part, part], max_samples=1000, seed=1)
    b = LabelSamples.pooled([part, part], max_samples=1000, seed=1)
    assert len(a.labels) == 1000
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert len(LabelSamples.pooled([part, part]).labels) == 2 * np.prod(SHAPE)


def test_leave_one_shot_out_alpha():
    """Two shots whose maps agree: each predicts the other's box exactly, so alpha is the true box's (below 1: a
    box may shrink a little and keep 99 %). When shot 2's map is shifted by d, shot 1 predicts shot 2's organ d
    off, and alpha is what that box needs to reach the target."""
    grid = body_grid(WHOLE, (4.0, 4.0, 4.0), SHAPE)
    label = organ_label()
    mask = label == 3
    truth = np.array([[10, 5, 3], [19, 14, 8]], float)
    shot = LabelSamples.from_shot(index_map(), label, grid)
    same = held_out_boxes([shot, shot], [index_map(), index_map()], [grid, grid], [3], k=1)
    np.testing.assert_array_equal(same[0][3], truth)
    exact = alpha_for_recall(mask, truth)
    assert calibrate_transfer_alpha([b[3] for b in same], [mask, mask]) == exact
    d = np.array([2, 0, 0])
    shifted = LabelSamples.from_shot(index_map(d), label, grid)
    boxes = held_out_boxes([shot, shifted], [index_map(), index_map(d)], [grid, grid], [3], k=1)
    np.testing.assert_array_equal(boxes[0][3], truth + d)  # shot 1 seen through shot 2's samples
    np.testing.assert_array_equal(boxes[1][3], truth - d)
    alpha = calibrate_transfer_alpha([b[3] for b in boxes], [mask, mask])
    assert alpha == pytest.approx(max(alpha_for_recall(mask, truth + d), alpha_for_recall(mask, truth - d)))
    assert alpha > 1.0 > exact
    assert held_out_boxes([shot], [index_map()], [grid], [3]) == [] and calibrate_transfer_alpha([], [mask]) is None


def test_outside_the_search_region_is_background_and_never_a_sample():
    """A test map whose air (outside the region, +inf) would match the organ's samples exactly finds the organ
    inside the region only; shot samples outside the region are left out."""
    from nnunet_ape.localize.retrieval import outside_to_inf

    grid = body_grid(WHOLE, (4.0, 4.0, 4.0), SHAPE)
    region = np.ones(SHAPE, bool)
    region[30:, :, :] = False
    shot = LabelSamples.from_shot(outside_to_inf(index_map(), region), organ_label(), grid)
    assert len(shot.labels) == 30 * 30 * 20 and np.isfinite(shot.embeddings).all()
    test = index_map()
    test[30:] = test[10:20]  # the "air" repeats the organ's embeddings
    found = LabelTransfer(shot, k=1).neighbours(outside_to_inf(test, region), grid)
    np.testing.assert_array_equal(found.organ_box(3), [[10, 5, 3], [19, 14, 8]])
    assert not (found.labels.reshape(*grid.dims, 1)[30:] == 3).any()
    unmasked = LabelTransfer(shot, k=1).neighbours(test, grid)
    assert (unmasked.labels.reshape(*grid.dims, 1)[30:] == 3).any()  # without the region the air is organ


def test_an_organ_counts_only_among_the_samples_of_shots_that_contour_it():
    """Two identical shots, one of which does not contour the organ (label 0 there, as in partially contoured data
    sets): the organ's neighbour fraction is taken over the contouring shot only, so its box is found at full
    strength; without the groups the silent shot halves it."""
    grid = body_grid(WHOLE, (4.0, 4.0, 4.0), SHAPE)
    both = organ_label(value=3) + organ_label(lo=(25, 5, 3), hi=(30, 10, 8), value=5)
    only_5 = organ_label(lo=(25, 5, 3), hi=(30, 10, 8), value=5)
    shots = [LabelSamples.from_shot(index_map(), both, grid, [3, 5], contoured=[3, 5]),
             LabelSamples.from_shot(index_map(), only_5, grid, [3, 5], contoured=[5])]
    pooled = LabelSamples.pooled(shots)
    assert pooled.group_values == [[3, 5], [5]] and set(pooled.groups.tolist()) == {0, 1}
    found = LabelTransfer(pooled, k=2).neighbours(index_map(), grid)
    inside = found.fraction(3).reshape(grid.dims)[10:20, 5:15, 3:9]
    assert inside.min() == 1.0 and found.fraction(5).reshape(grid.dims)[25:31, 5:11, 3:9].min() == 1.0
    np.testing.assert_array_equal(found.organ_box(3, threshold=0.9), [[10, 5, 3], [19, 14, 8]])
    silent = LabelSamples.pooled([LabelSamples.from_shot(index_map(), both, grid, [3, 5]),
                                  LabelSamples.from_shot(index_map(), only_5, grid, [3, 5])])
    assert silent.group_values is None
    assert LabelTransfer(silent, k=2).neighbours(index_map(), grid).fraction(3).max() == 0.5
