"""Training batches: view geometry as the paper describes it, and positions consistent with the views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import patient
from nnunet_ape.io import read_volume, to_canonical
from nnunet_ape.pretrain.augment import AugmentConfig, augment_view
from nnunet_ape.pretrain.batches import BatchConfig, PairBatches, make_batch, sample_view_points
from nnunet_ape.pretrain.cache import FOREGROUND_HU, foreground_box, prepare_cache
from nnunet_ape.pretrain.loss import sample_embeddings
from nnunet_ape.pretrain.views import PAPER_PATCH_VOLUME, ViewBox, fit_scan_axis, keep_inside, sample_patch_shape, sample_spacing

NO_AUGMENT = AugmentConfig(p_window=0, p_blur=0, p_sharpen=0, p_noise=0, p_mask=0)


def test_patch_shapes_have_the_paper_volume_and_aspect_ratio():
    rng = np.random.default_rng(0)
    shapes = np.array([sample_patch_shape(rng) for _ in range(300)])
    volumes = shapes.prod(1)
    assert np.all(np.abs(volumes / PAPER_PATCH_VOLUME - 1) < 0.05)
    assert np.all(shapes.max(1) / shapes.min(1) <= 2.0)
    assert len({tuple(s) for s in shapes}) > 100  # random, not one fixed shape


def test_spacings_lie_in_the_paper_range():
    rng = np.random.default_rng(0)
    spacings = np.array([sample_spacing(rng) for _ in range(500)])
    assert np.all(spacings >= [1, 1, 1.5]) and np.all(spacings <= [2, 2, 3])
    assert np.all(spacings.min(0) < [1.1, 1.1, 1.6]) and np.all(spacings.max(0) > [1.9, 1.9, 2.9])


def _linear_field(shape, spacing):
    index = np.indices(shape).astype(np.float32)
    return sum(c * i * s for c, i, s in zip((1.0, 3.0, 7.0), index, spacing)) / 10


@pytest.mark.parametrize("variant", ["naive", "aug", "equiv"])
def test_views_coords_and_positions_agree(variant):
    """Where a batch says a point is (coords in each view), the view shows the value at its physical position."""
    spacing = (2.0, 2.5, 3.0)
    volume = _linear_field((60, 50, 40), spacing)
    cfg = BatchConfig(variant=variant, pairs=3, voxels=300, patch_volume=20_000, augment=NO_AUGMENT)
    batch = make_batch(volume, spacing, cfg, np.random.default_rng(1))
    n_views = 3 if variant == "naive" else 6
    assert batch["views"].shape[:2] == (n_views, 1)
    assert batch["coords"].shape == (n_views, 100, 3)
    assert batch["positions"].shape == (3, 100, 3)
    values = sample_embeddings(batch["views"] * 1000, batch["coords"])[..., 0]  # undo the /1000 input scaling
    p = batch["positions"]
    expected = (p[..., 0] * 1 + p[..., 1] * 3 + p[..., 2] * 7) / 10
    step = 1 if variant == "naive" else 2
    for offset in range(step):
        assert torch.allclose(values[offset::step], expected, atol=1e-3)


def test_pair_views_differ_in_spacing_and_overlap():
    spacing = (2.0, 2.0, 2.0)
    volume = _linear_field((80, 80, 80), spacing)
    cfg = BatchConfig(variant="aug", pairs=8, voxels=800, patch_volume=20_000, augment=NO_AUGMENT)
    batch = make_batch(volume, spacing, cfg, np.random.default_rng(3))
    coords = batch["coords"]
    size = torch.tensor(batch["views"].shape[-3:]) - 1
    assert torch.all(coords >= -1e-3) and torch.all(coords <= size + 1e-3)  # every point inside both views
    # the same points sit at different voxel coordinates in the two views (other spacing and offset)
    assert (coords[0::2] - coords[1::2]).abs().mean() > 1.0


def test_fit_scan_axis_shortens_only_the_scan_axis():
    extent = np.array([300.0, 300.0, 100.0])
    # 0.6 * 100 mm at up to 5 mm per voxel = 12 steps = 13 voxels
    assert fit_scan_axis((40, 40, 40), extent, np.array([5.0, 5.0, 5.0]), 0.6) == (40, 40, 13)
    assert fit_scan_axis((40, 40, 10), extent, np.array([5.0, 5.0, 5.0]), 0.6) == (40, 40, 10)  # already short
    assert fit_scan_axis((40, 40, 40), np.array([300.0, 300.0, 20.0]), np.array([5.0] * 3), 0.6) == (40, 40, 8)
    assert fit_scan_axis((40, 40, 40), extent, np.array([5.0] * 3), 0.0) == (40, 40, 40)  # 0 turns it off


def test_keep_inside_moves_a_view_into_the_scan_along_z():
    view = ViewBox(np.array([-50.0, -20.0, -30.0]), np.array([2.0, 2.0, 2.0]), (10, 10, 11))  # 20 mm long in z
    moved = keep_inside(view, np.array([100.0, 100.0, 100.0]))
    assert moved.start.tolist() == [-50.0, -20.0, 0.0]
    assert keep_inside(ViewBox(np.array([0.0, 0.0, 95.0]), view.spacing, view.shape), np.full(3, 100.0)).start[2] == 80.0
    too_long = ViewBox(np.array([0.0, 0.0, -30.0]), view.spacing, (10, 10, 100))
    assert keep_inside(too_long, np.full(3, 100.0)).start[2] == -30.0  # cannot fit: unchanged


@pytest.mark.parametrize("variant", ["naive", "equiv"])
def test_views_never_show_the_end_of_a_short_scan(variant):
    """A scan shorter than the views: by default no view reaches past its first or last slice (where the body
    would end in a cut with air beyond), and each covers at most 60 % of it; without the limit they do."""
    spacing = (4.0, 4.0, 5.0)
    z_mm = np.arange(16) * spacing[2]  # 75 mm scan, in-plane wider than any view
    volume = np.broadcast_to(z_mm[None, None, :] + 100.0, (90, 90, 16)).astype(np.float32)
    views = []
    for limit in (BatchConfig.max_scan_fraction, 0.0):
        cfg = BatchConfig(variant=variant, pairs=4, voxels=400, patch_volume=30_000, spacing_range=((4, 4, 5), (5, 5, 6)),
                          augment=NO_AUGMENT, max_scan_fraction=limit)
        batches = [make_batch(volume, spacing, cfg, np.random.default_rng(s))["views"].flatten(1) for s in range(5)]
        views.append(torch.cat([torch.stack([b.min(1).values, b.max(1).values], 1) for b in batches]))  # per view
    limited, unlimited = views
    assert limited[:, 0].min() > 0  # no air: every voxel of every view lies inside the scan
    span_mm = (limited[:, 1] - limited[:, 0]) * 1000  # views hold HU / 1000
    assert span_mm.max() <= 0.6 * z_mm[-1] + 1e-3
    assert unlimited[:, 0].min() < 0  # the old views showed air beyond the scan's ends


def test_augmentations_keep_shape_and_change_values():
    hu = np.random.default_rng(0).normal(0, 300, (24, 24, 16)).astype(np.float32)
    rng = np.random.default_rng(0)
    outs = [augment_view(hu, rng, AugmentConfig(p_mask=1.0, p_noise=1.0)) for _ in range(5)]
    assert all(o.shape == hu.shape and o.dtype == np.float32 for o in outs)
    assert all(np.any(o == 0.0) for o in outs)  # masked boxes
    assert not np.allclose(outs[0], outs[1])
    plain = augment_view(hu, rng, NO_AUGMENT)
    assert np.allclose(plain, np.clip(hu, -1000, 1000) / 1000)


def test_foreground_crop_on_real_ct_removes_air_keeps_body(tmp_path):
    canon, _ = to_canonical(read_volume(patient("B")))
    box = foreground_box(canon.array)
    cropped = canon.array[box]
    assert cropped.size < 0.8 * canon.array.size
    labels, _ = ndimage.label(canon.array > -500)
    body = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1  # largest dense component (the table is not)
    assert body[box].sum() == body.sum()
    cached = prepare_cache([patient("B")], tmp_path / "cache")
    assert np.load(cached[0].path).shape == cropped.shape
    again = prepare_cache([patient("B")], tmp_path / "cache")  # reused, not rewritten
    assert again == cached


def _body_in_air(shape=(40, 40, 40), spacing=(2.0, 2.0, 3.0)):
    """A CT ``(X, Y, Z)`` in HU: a soft-tissue block (40 HU) in its middle half along x and y, air elsewhere."""
    volume = np.full(shape, -1000.0, dtype=np.float32)
    a, b = shape[0] // 4, shape[0] * 3 // 4
    volume[a:b, a:b, :] = 40.0
    return volume, np.asarray(spacing)


def _hu_at(volume, spacing, points):
    index = np.clip(np.rint(points / spacing).astype(int), 0, np.asarray(volume.shape) - 1)
    return volume[index[:, 0], index[:, 1], index[:, 2]]


@pytest.mark.parametrize("mode, body_share", [("uniform", (0.18, 0.32)), ("body", (1.0, 1.0)), ("balanced", (0.5, 0.5))])
def test_view_points_fall_where_their_mode_says(mode, body_share):
    volume, spacing = _body_in_air()
    lo, hi = np.zeros(3), (np.asarray(volume.shape) - 1) * spacing
    points = sample_view_points(np.random.default_rng(0), lo, hi, 400, volume, spacing, mode)
    assert points.shape == (400, 3) and np.all(points >= lo) and np.all(points <= hi)
    share = float(np.mean(_hu_at(volume, spacing, points) > FOREGROUND_HU))
    assert body_share[0] <= share <= body_share[1]  # the block is a quarter of the volume


def test_body_points_fill_up_with_air_where_a_view_holds_little_body():
    volume, spacing = _body_in_air()
    lo, hi = np.zeros(3), np.array([22.0, 22.0, 60.0])  # a corner box touching the block's edge only
    points = sample_view_points(np.random.default_rng(0), lo, hi, 300, volume, spacing, "body")
    inside = _hu_at(volume, spacing, points) > FOREGROUND_HU
    assert len(points) == 300 and 0 < inside.sum() < 300


def test_batches_with_body_points_read_them_in_both_views():
    volume, spacing = _body_in_air((60, 60, 60))
    cfg = BatchConfig(variant="equiv", pairs=2, voxels=200, patch_volume=20**3, spacing_range=((2, 2, 3), (2.5, 2.5, 3.5)),
                      augment=NO_AUGMENT, points="body")
    batch = make_batch(volume, tuple(spacing), cfg, np.random.default_rng(1))
    positions = batch["positions"].numpy().reshape(-1, 3)
    assert np.mean(_hu_at(volume, spacing, positions) > FOREGROUND_HU) > 0.9
    with pytest.raises(ValueError, match="point mode"):
        PairBatches([], BatchConfig(points="organs"))
