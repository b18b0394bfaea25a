"""BPR slice augmentations (bpreg's defaults): shapes and range, each transform exactly where checkable, one draw
per CT, on real CT, and in the training stream."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import patient
from nnunet_ape.bpr.augment import SliceAugmentConfig, augment_slices, gaussian_blur, scale_rotate
from nnunet_ape.bpr.slices import axial_slices
from nnunet_ape.bpr.train_bpr import BPRConfig, SliceBatches
from nnunet_ape.io import read_volume
from nnunet_ape.pretrain.cache import CachedCT

PROBABILITIES = ("p_noise", "p_shift", "p_scale", "p_frame", "p_flip", "p_transpose", "p_affine", "p_blur")
NONE = SliceAugmentConfig(**{p: 0.0 for p in PROBABILITIES})


def only(p: str, value: float = 1.0) -> SliceAugmentConfig:
    """The config with just probability ``p`` set (to ``value``), all other transforms off."""
    return replace(NONE, **{p: value})


def smooth_random(m: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``(m, 1, size, size)`` asymmetric smooth values in about [-0.6, 0.6], different per slice."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(m, 1, size // 4, size // 4, generator=g) - 0.5
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) * 1.2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_and_range_are_kept(dtype):
    rng = np.random.default_rng(0)
    x = (torch.rand(4, 1, 40, 40, dtype=dtype) * 2 - 1).clamp(-1, 1)
    x[:, :, :5] = 1.0  # saturated values: shift, scale and noise must clip them
    everything = replace(SliceAugmentConfig(), **{p: 1.0 for p in PROBABILITIES}, noise_std=(0.5, 0.5))
    for cfg in (SliceAugmentConfig(), everything):
        for _ in range(10):
            y = augment_slices(x, rng, cfg)
            assert y.shape == x.shape and y.dtype == dtype
            assert y.min() >= -1 and y.max() <= 1 and torch.isfinite(y).all()


def test_all_probabilities_zero_is_the_identity():
    x = smooth_random()
    assert torch.equal(augment_slices(x, np.random.default_rng(0), NONE), x)


def test_flip_is_left_right_along_the_first_axis():
    x = smooth_random()
    assert torch.equal(augment_slices(x, np.random.default_rng(0), only("p_flip")), torch.flip(x, dims=[2]))


def test_transpose_swaps_the_in_plane_axes():
    x = smooth_random()
    assert torch.equal(augment_slices(x, np.random.default_rng(0), only("p_transpose")), x.transpose(2, 3))


def test_frame_sets_air_outside_the_circle_only():
    x = smooth_random(size=64)
    y = augment_slices(x, np.random.default_rng(0), only("p_frame"))
    for corner in (y[..., 0, 0], y[..., 0, -1], y[..., -1, 0], y[..., -1, -1], y[..., 31, 0], y[..., 0, 31]):
        assert torch.all(corner == -1)
    # radius 0.75 * 32 = 24 pixels around the centre (31.5, 31.5): a 32 x 32 centre square is inside
    assert torch.equal(y[..., 16:48, 16:48], x[..., 16:48, 16:48])
    assert torch.equal(y[..., 31, 9:55], x[..., 31, 9:55])  # 22.5 pixels either side of the centre
    assert torch.all(y[..., 31, :7] == -1) and torch.all(y[..., 31, 57:] == -1)


def test_intensity_transforms_shift_and_scale():
    x = smooth_random()
    shifted = augment_slices(x, np.random.default_rng(1), only("p_shift"))
    offset = (shifted - x).flatten()
    assert torch.allclose(offset, offset[0].expand_as(offset), atol=1e-6) and 0 < abs(offset[0]) <= 0.08
    scaled = augment_slices(x, np.random.default_rng(1), only("p_scale"))
    factor = scaled[x.abs() > 0.1] / x[x.abs() > 0.1]
    assert torch.allclose(factor, factor[0].expand_as(factor), atol=1e-5) and 0.8 <= factor[0] <= 1.2
    # each step clips to [-1, 1], as bpreg's: 0.95 + 0.08 -> 1, then x 0.8 -> 0.8 (not 1.03 x 0.8)
    both = replace(NONE, p_shift=1.0, p_scale=1.0, shift=(0.08, 0.08), scale=(0.8, 0.8))
    y = augment_slices(torch.full((2, 1, 8, 8), 0.95), np.random.default_rng(0), both)
    assert torch.allclose(y, torch.full_like(y, 0.8))


def test_rotation_and_zoom_geometry():
    x = smooth_random(size=32)
    # 90 degrees maps pixel centres onto pixel centres: a plain rotation of the array
    rotated = scale_rotate(x, 1.0, 90.0)
    assert torch.allclose(rotated, torch.rot90(x, 1, dims=(2, 3)), atol=1e-5)
    assert torch.allclose(scale_rotate(x, 1.0, 0.0), x, atol=1e-6)
    # zoom > 1 enlarges: a centred disc of radius 6 becomes one of radius ~ 7.2 (area x 1.44)
    yy, xx = torch.meshgrid(torch.arange(32.0) - 15.5, torch.arange(32.0) - 15.5, indexing="ij")
    disc = torch.where(yy**2 + xx**2 <= 36, 1.0, -1.0)[None, None]
    area = (scale_rotate(disc, 1.2, 0.0) > 0).sum() / (disc > 0).sum()
    assert float(area) == pytest.approx(1.44, rel=0.15)


def test_blur_keeps_constants_and_smooths():
    constant = torch.full((2, 1, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(constant, 1.0), constant, atol=1e-6)
    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.2
    assert gaussian_blur(noise, 1.0).std() < 0.5 * noise.std()
    assert gaussian_blur(noise, 1.0).shape == noise.shape


def test_one_draw_per_ct_for_all_its_slices():
    """Identical slices stay identical under every transform but the noise, which differs per slice."""
    x = smooth_random(m=1).expand(6, 1, 32, 32).contiguous()
    rng = np.random.default_rng(0)
    changed = 0
    for _ in range(20):
        y = augment_slices(x, rng, replace(SliceAugmentConfig(), p_noise=0.0))
        assert all(torch.equal(y[0], y[i]) for i in range(1, 6))
        changed += not torch.equal(y, x)
    assert changed >= 15
    y = augment_slices(x, rng, only("p_noise"))
    assert not torch.equal(y[0], y[1]) and (y - x).abs().max() > 0


@pytest.mark.parametrize("p", PROBABILITIES)
def test_each_default_transform_fires_at_its_rate(p):
    """With the default probability (the others off), a transform changes the slices in about that fraction of
    CTs: it fires, and not always."""
    cfg, rng, x = only(p, getattr(SliceAugmentConfig(), p)), np.random.default_rng(0), smooth_random(m=2, size=24)
    fired = np.mean([not torch.equal(augment_slices(x, rng, cfg), x) for _ in range(300)])
    assert fired == pytest.approx(getattr(cfg, p), abs=0.08)


def test_default_augmentations_keep_the_body_of_a_real_ct():
    slices = axial_slices(read_volume(patient("A")), [10, 56, 100])  # pelvis to upper abdomen
    centre = (slice(None), slice(None), slice(44, 84), slice(44, 84))
    assert slices[centre].mean() > -0.4  # soft tissue ~ -0.17 on the [-1000, 1500] HU scale
    rng, changed = np.random.default_rng(0), 0
    for _ in range(20):
        y = augment_slices(slices, rng, SliceAugmentConfig())
        changed += not torch.equal(y, slices)
        assert y[centre].mean(dim=(1, 2, 3)).min() > -0.6  # still body, not air (-1)
        body = (y > -0.6).float().mean(dim=(1, 2, 3)) / (slices > -0.6).float().mean(dim=(1, 2, 3))
        assert body.min() > 0.4 and body.max() < 1.6  # zoom 0.8-1.2 and the frame change the area, never erase it
    assert changed >= 18


def test_slice_batches_are_augmented_by_default(tmp_path):
    z = np.arange(40)
    ct = (np.zeros((60, 50, 40)) - 1000 + 20 * z).astype(np.int16)  # brighter towards the head
    ct[15:45, 10:40] += 800
    np.save(tmp_path / "ct.npy", ct)
    cached = [CachedCT(tmp_path / "ct.npy", (2.0, 2.0, 3.0))]
    plain = next(iter(SliceBatches(cached, BPRConfig(cts=2, augment="none"), seed=3)))
    augmented = next(iter(SliceBatches(cached, BPRConfig(cts=2), seed=3)))
    assert BPRConfig().augment == "light"
    assert augmented["slices"].shape == plain["slices"].shape == (16, 1, 128, 128)
    # same first sample (the augmentation draws come after it), different pixels
    assert torch.equal(augmented["z_mm"][0], plain["z_mm"][0])
    assert not torch.equal(augmented["slices"][:8], plain["slices"][:8])
    assert augmented["slices"].min() >= -1 and augmented["slices"].max() <= 1
