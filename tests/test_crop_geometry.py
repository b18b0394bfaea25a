"""Crop boxes on the source grid: crops overlay their source, paste-back is the identity, training boxes hold
their labels. On real CT in both orientations the data has (patient A RAS-like, B LPS)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DATA, patient
from nnunet_ape.crop_geometry import crop, crop_box, fraction_inside, grow_to_contain, mask_crop_box, paste
from nnunet_ape.io import read_volume, write_volume

SEGS = {"A": "ts_a_abdomen_pelvis_seg.nii.gz", "B": "ts_b_upper_abdomen_seg.nii.gz"}


@pytest.mark.parametrize("key", ["A", "B"])
def test_crop_overlays_source_and_paste_is_identity(key, tmp_path):
    ct = read_volume(patient(key))
    seg = read_volume(DATA / SEGS[key])
    assert np.abs(np.diag(ct.direction)).min() > 0.99  # A: (-1, -1, 1), B: identity
    box = crop_box(np.array([[10.4, 20.0, 3.0], [60.2, 70.9, 15.0]]), ct.shape)
    assert box.tolist() == [[10, 20, 3], [62, 72, 16]]  # rounded outwards
    cropped = crop(seg.with_array(seg.array), box)
    path = write_volume(cropped, tmp_path / "crop.nii.gz")
    image, source = sitk.ReadImage(str(path)), sitk.ReadImage(str(DATA / SEGS[key]))
    for index in ([0, 0, 0], [51, 51, 12], [7, 30, 5]):
        inside = [int(i + o) for i, o in zip(index, box[0])]
        assert np.allclose(image.TransformIndexToPhysicalPoint(index), source.TransformIndexToPhysicalPoint(inside), atol=1e-3)
        assert image.GetPixel(index) == source.GetPixel(inside)
    assert image.GetSpacing() == pytest.approx(source.GetSpacing()) and image.GetDirection() == pytest.approx(source.GetDirection())
    pasted = paste(read_volume(path).array, box, ct.shape)
    assert np.array_equal(pasted[tuple(slice(a, b) for a, b in zip(*box))], seg.array[tuple(slice(a, b) for a, b in zip(*box))])
    outside = np.ones(ct.shape, bool)
    outside[tuple(slice(a, b) for a, b in zip(*box))] = False
    assert not pasted[outside].any()


def test_crop_box_is_clipped_and_never_empty():
    assert crop_box(np.array([[-5.0, -3, -1], [200, 300, 400]]), (50, 60, 70)).tolist() == [[0, 0, 0], [50, 60, 70]]
    outside = crop_box(np.array([[80.0, 90, 100], [85, 95, 105]]), (50, 60, 70))
    assert (outside[1] - outside[0] >= 1).all() and (outside[1] <= [50, 60, 70]).all()


def test_training_box_grows_to_hold_the_label_plus_margin():
    seg = read_volume(DATA / SEGS["A"])
    liver = seg.array == 5
    tight = mask_crop_box(liver)
    cut = tight.copy()
    cut[1, 2] -= 10  # a localizer box that misses the liver's top 10 slices
    assert fraction_inside(liver, cut) < 1
    grown, moved = grow_to_contain(cut, liver, 10.0, seg.spacing)
    assert fraction_inside(liver, grown) == 1.0
    margin = np.ceil(10.0 / np.asarray(seg.spacing) - 1e-9).astype(int)
    expected_hi = np.minimum(tight[1] + margin, seg.shape)
    assert grown[1, 2] == expected_hi[2]
    assert moved[1, 2] == pytest.approx((expected_hi[2] - cut[1, 2]) * seg.spacing[2])
    unchanged, none = grow_to_contain(grown, liver, 10.0, seg.spacing)
    assert np.array_equal(unchanged, grown) and not none.any()


@pytest.mark.parametrize("key", ["A", "B"])  # RAS-like (flipped axes) and LPS
def test_boxes_from_a_strided_map_are_in_ct_voxels(key):
    """A map on every few voxels (``embed --stride``, a map on disk) gives boxes in the CT's own voxels.
    With a map that is the physical position itself (retrieval exact on the full map) the full map finds the box the
    edge points span, and a map on every 3rd voxel finds it within one map cell."""
    from nnunet_ape.io import Volume
    from nnunet_ape.localize.predict_boxes import predict_organ_boxes

    ct = read_volume(patient(key))
    index = np.stack(np.meshgrid(*[np.arange(n) for n in ct.shape], indexing="ij"), axis=-1)
    full = ct.with_array((ct.index_to_physical(index) / 100).astype(np.float32))
    strided = Volume(full.array[::3, ::3, ::3], tuple(3 * s for s in ct.spacing), ct.origin, ct.direction)
    # an "organ" in the middle of the body: retrieval searches the body only (air never matches)
    localizer, lo, hi = _position_localizer(ct)
    exact = np.asarray(predict_organ_boxes(localizer, ct, full)["liver"]["crop_box_voxels"])
    assert np.allclose(exact, [lo, hi], atol=0.51)
    coarse = np.asarray(predict_organ_boxes(localizer, ct, strided)["liver"]["crop_box_voxels"])
    assert np.abs(coarse[0] - lo).max() <= 1.5 + 0.51 and np.abs(coarse[1] - hi).max() <= 3.5 + 0.51


@pytest.mark.parametrize("key", ["A", "B"])  # RAS-like (flipped axes) and LPS
def test_boxes_from_the_map_at_the_model_spacing_are_within_a_model_voxel_of_the_full_maps(key):
    """Preprocess and predict find boxes on the network's map as it is, on the model's coarse grid (issue 29, item
    8: no full-resolution map, GBs for a 512x512x300 CT). A map that is the physical position itself, computed on a
    model grid of 1.7-2.6 CT voxels per voxel (not whole numbers): resampled onto every voxel (the previous path) it
    finds the edge points' box exactly; on the model grid, within one model voxel of it, in the CT's own voxels."""
    import torch

    from nnunet_ape.canonical import canonical_ct
    from nnunet_ape.embed import EmbedSettings, NetworkMap, canonical_map, grid_map
    from nnunet_ape.localize.predict_boxes import predict_organ_boxes

    ct = canonical_ct(read_volume(patient(key)))
    canon = ct.canon
    settings = EmbedSettings(spacing=tuple(s * f for s, f in zip(canon.spacing, (1.7, 2.2, 2.6))))
    step = np.array(settings.spacing) / np.array(canon.spacing)
    shape = [int((n - 1) / t + 1e-6) + 1 for n, t in zip(canon.shape, step)]  # as resample_spacing makes it
    index = np.stack(np.meshgrid(*[np.arange(n) * t for n, t in zip(shape, step)], indexing="ij"), axis=-1)
    position = (canon.index_to_physical(index) / 100).astype(np.float32)  # (X', Y', Z', 3)
    network = NetworkMap(torch.from_numpy(position).permute(3, 0, 1, 2).contiguous(), ct)
    localizer, lo, hi = _position_localizer(ct.source)
    full = np.asarray(predict_organ_boxes(localizer, ct, canonical_map(network, settings))["liver"]["crop_box_voxels"])
    assert np.allclose(full, [lo, hi], atol=0.51)
    coarse = np.asarray(predict_organ_boxes(localizer, ct, grid_map(network, settings))["liver"]["crop_box_voxels"])
    cell = np.empty(3)
    cell[list(ct.orientation.perm)] = step  # one model voxel, in CT voxels along the CT's own axes
    assert (np.abs(coarse - full) <= cell + 0.51).all(), (coarse, full, cell)
    # widened by half a cell: never inside the full map's box by more than the half CT voxel a nearest map voxel can be
    assert (coarse[0] <= full[0] + 0.51).all() and (coarse[1] >= full[1] - 0.51).all()


def _position_localizer(ct) -> tuple[dict, np.ndarray, np.ndarray]:
    """A one-shot edge-point localizer for a box-shaped "organ" in the middle of ``ct``'s body (retrieval searches
    the body only), on a map that is the physical position / 100: (localizer, the box's low and high voxel)."""
    from nnunet_ape.localize.body import body_box

    middle = np.round(body_box(ct.array).mean(0)).astype(int)
    lo, hi = middle - np.array([12, 14, 4]), middle + np.array([12, 14, 4])
    centre = (lo + hi) / 2
    points = []
    for axis in range(3):
        for end in (lo, hi):
            p = centre.copy()
            p[axis] = end[axis]
            points.append(np.round(p))
    edges = ct.index_to_physical(np.array(points)) / 100
    shot = {"edge_embeddings": edges.tolist()}
    return {"organs": {"liver": {"label": 1, "alpha": 1.0, "shots": [shot]}}, "combine": "mean"}, lo, hi
