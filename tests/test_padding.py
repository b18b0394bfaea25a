"""Scanner padding outside the scan circle (-3024 HU in the crlm CTs; -2048, -2000 on other scanners) is air, never
body: every crop, box, body mask, slice centre, network input and map is the same as with the padding set to air."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import DATA
from nnunet_ape.bpr.scoring import clean_slice_scores
from nnunet_ape.bpr.slices import axial_slices, slice_centre
from nnunet_ape.embed import EmbedSettings, embed_volume
from nnunet_ape.intensity import floor_at_air
from nnunet_ape.io import Volume, read_volume, to_canonical, write_volume
from nnunet_ape.localize.body import body_box
from nnunet_ape.models.ape import PRESETS, APENet
from nnunet_ape.models.bpr import BPRNet
from nnunet_ape.nnunet.unlabeled_dataset import body_label
from nnunet_ape.pretrain.augment import AugmentConfig, augment_view
from nnunet_ape.pretrain.batches import extract_view
from nnunet_ape.pretrain.cache import foreground_box, prepare_cache
from nnunet_ape.pretrain.views import ViewBox

PADDING = -3024  # what the crlm scanner wrote outside the scan circle
AIR = -1000
OTHER_PADDINGS = (-2048, -2000)


def _canonical(name: str) -> Volume:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"real CT not found: {path} (set NNUNET_APE_TEST_DATA)")
    canon, _ = to_canonical(read_volume(path))
    assert (canon.array == PADDING).mean() > 0.05  # the scan circle is padded
    return canon


@pytest.fixture(scope="module")
def ct_1004() -> Volume:
    return _canonical("crlm_1004_abdomen_ct.nii.gz")


@pytest.fixture(scope="module")
def ct_1006() -> Volume:
    return _canonical("crlm_1006_abdomen_ct.nii.gz")


def repad(volume: Volume, value: float) -> Volume:
    """``volume`` with its padding voxels set to ``value``."""
    return volume.with_array(np.where(volume.array == PADDING, value, volume.array).astype(volume.array.dtype))


def padded_variants(volume: Volume) -> dict[int, Volume]:
    """The CT as the scanner wrote it and with the other scanners' padding values, by padding value."""
    return {PADDING: volume, **{value: repad(volume, value) for value in OTHER_PADDINGS}}


def inside_the_image(box: np.ndarray, shape: tuple[int, ...]) -> bool:
    """True when an inclusive box ``(2, 3)`` leaves out some of the image in x and in y: had padding, which reaches
    the image border in every axial slice, counted as body, the box would span the whole slice."""
    return all(box[0][a] > 0 or box[1][a] < shape[a] - 1 for a in (0, 1))


def test_floor_at_air_raises_only_values_below_air():
    hu = np.array([-3024, -2048, -2000, -1024, -1000, -999, -500, 40, 3000], dtype=np.int16)
    floored = floor_at_air(hu)
    assert floored.dtype == np.int16
    assert floored.tolist() == [-1000, -1000, -1000, -1000, -1000, -999, -500, 40, 3000]
    assert floor_at_air(hu.astype(np.float32)).tolist() == floored.tolist()


def test_foreground_crop_and_cache_ignore_padding(ct_1006, tmp_path):
    box = foreground_box(ct_1006.array)
    cropped = ct_1006.array[box]
    assert (cropped == PADDING).any()  # the body box reaches past the scan circle's edge: padding is in the crop
    assert inside_the_image(np.array([[s.start for s in box], [s.stop - 1 for s in box]]), ct_1006.shape)
    assert foreground_box(repad(ct_1006, AIR).array) == box
    for value, variant in padded_variants(ct_1006).items():
        assert foreground_box(variant.array) == box, value
    slab = Volume(ct_1006.array[:, :, 20:30], ct_1006.spacing)  # ten slices keep the written files small
    assert (slab.array[foreground_box(slab.array)] == PADDING).any()
    sources = {value: write_volume(variant, tmp_path / f"pad{-value}.nrrd") for value, variant in padded_variants(slab).items()}
    sources["air"] = write_volume(repad(slab, AIR), tmp_path / "air.nrrd")
    cached = {key: np.load(c.path) for key, c in zip(sources, prepare_cache(list(sources.values()), tmp_path / "cache"))}
    for value in padded_variants(ct_1006):
        assert np.array_equal(cached[value], cached["air"]), value  # padding is cached as air
    assert cached["air"].min() >= AIR


def test_body_mask_and_box_ignore_padding(ct_1004):
    air = repad(ct_1004, AIR)
    box, mask = body_box(air.array), body_label(air).array
    assert inside_the_image(box, air.shape) and 0.2 < mask.mean() < 0.6
    for value, variant in padded_variants(ct_1004).items():
        assert np.array_equal(body_box(variant.array), box), value
        assert np.array_equal(body_label(variant).array, mask), value


def test_bpr_slices_read_padding_as_air(ct_1004, ct_1006):
    for ct in (ct_1004, ct_1006):
        z = list(range(0, ct.shape[2], 4))
        air = repad(ct, AIR)
        centres = [slice_centre(np.asarray(air.array[:, :, i], dtype=np.float32)) for i in z]
        for centre_on_body in (True, False):
            expected = axial_slices(air, z, centre_on_body=centre_on_body)
            for value, variant in padded_variants(ct).items():
                # resampled before clipping, padding would darken the table where it meets the circle's edge
                assert torch.equal(axial_slices(variant, z, centre_on_body=centre_on_body), expected), (value, centre_on_body)
        for value, variant in padded_variants(ct).items():
            assert [slice_centre(np.asarray(variant.array[:, :, i], dtype=np.float32)) for i in z] == centres, value


def test_bpr_scores_and_body_slices_ignore_padding(ct_1004):
    torch.manual_seed(0)
    model = BPRNet("tiny").eval()
    raw, body, cleaned = clean_slice_scores(model, repad(ct_1004, AIR))
    assert body.all() and np.isfinite(cleaned).all()
    for value, variant in padded_variants(ct_1004).items():
        raw_v, body_v, cleaned_v = clean_slice_scores(model, variant)
        assert np.array_equal(body_v, body), value
        assert np.allclose(raw_v, raw, atol=1e-6) and np.allclose(cleaned_v, cleaned, atol=1e-6), value


def _view_on_padding(cached: np.ndarray, spacing: np.ndarray) -> ViewBox:
    """A view of the cached crop centred on a padding voxel next to something denser than air (the table)."""
    dense_padding = (cached == PADDING) & (np.roll(cached, 1, axis=1) > -900)
    x, y, z = np.argwhere(dense_padding)[0]
    view_spacing = np.array([1.3, 1.7, 3.1])  # off the source grid, so every view voxel is interpolated
    shape = (24, 24, 6)
    start = np.array([x, y, min(z, cached.shape[2] - 4)]) * spacing - (np.asarray(shape) - 1) / 2 * view_spacing
    return ViewBox(np.maximum(start, 0), view_spacing, shape)


def test_pretraining_views_and_their_augmentations_read_padding_as_air(ct_1006):
    # a cache written before padding was stored as air: extract_view must read it as air itself
    cached = ct_1006.array[foreground_box(ct_1006.array)]
    spacing = np.asarray(ct_1006.spacing)
    box = _view_on_padding(cached, spacing)
    air = repad(ct_1006, AIR).array[foreground_box(ct_1006.array)]
    expected = extract_view(air, spacing, box)
    assert expected.max() > -500  # the view shows air, padding and the table
    every_augmentation = AugmentConfig(p_window=1.0, p_blur=0.0, p_sharpen=1.0, p_noise=1.0, p_mask=0.0)
    augmented = augment_view(expected, np.random.default_rng(3), every_augmentation)
    for value in (PADDING, *OTHER_PADDINGS):
        padded = np.where(cached == PADDING, value, cached).astype(cached.dtype)
        view = extract_view(padded, spacing, box)
        assert np.array_equal(view, expected), value
        # sharpening and noise before the window clips would draw the circle's edge where the view shows air
        assert np.array_equal(augment_view(view, np.random.default_rng(3), every_augmentation), augmented), value
    assert expected.min() >= AIR and augmented.min() >= AIR / 1000  # nothing below air, whatever the HU window


def test_ape_map_ignores_padding(ct_1004):
    corner = ct_1004.array[:200, 150:350, 18:24]  # the right side: body, air, table and padding
    part = Volume(corner, ct_1004.spacing)
    assert (corner == PADDING).any() and (corner > -500).mean() > 0.1
    torch.manual_seed(0)
    model = APENet(PRESETS["tiny"]).eval()
    settings = EmbedSettings(spacing=(3.0, 3.0, 5.0), patch_size=(64, 64, 16), amp=False)
    expected = embed_volume(model, repad(part, AIR), settings, progress=False).array
    for value, variant in padded_variants(part).items():
        assert np.allclose(embed_volume(model, variant, settings, progress=False).array, expected, atol=1e-5), value
