"""Memory at data-set scale: cropped organ masks, compact label maps, embeddings as memory maps, no CT voxels kept."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from conftest import labeled_patient
from nnunet_ape.errors import InputError
from nnunet_ape.localize.boxes import alpha_for_recall, box_recall
from nnunet_ape.cases import label_values, read_case
from nnunet_ape.localize.masks import CroppedMask
from nnunet_ape.localize.zrange import z_recall


def _blob(shape=(40, 36, 30), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 3)
    mask = field > np.quantile(field, 0.9)
    mask[:, :, :4] = False  # keep the organ off one border, so the crop really is smaller
    return mask


def test_cropped_mask_answers_like_the_full_mask():
    mask = _blob()
    cropped = CroppedMask(mask)
    assert cropped.crop.size < mask.size and cropped.shape == mask.shape
    assert np.array_equal(cropped.full(), mask)
    assert cropped.sum() == mask.sum()
    assert np.array_equal(cropped.sum(axis=(0, 1)), mask.sum(axis=(0, 1)))
    rng = np.random.default_rng(1)
    for _ in range(50):
        lo = rng.uniform(-5, 30, 3)
        box = np.stack([lo, lo + rng.uniform(0, 25, 3)])
        assert box_recall(cropped, box) == pytest.approx(box_recall(mask, box))
    box = np.array([[12.0, 10.0, 9.0], [20.0, 18.0, 15.0]])
    assert alpha_for_recall(cropped, box, 0.99) == alpha_for_recall(mask, box, 0.99)
    assert z_recall(cropped, 8, 20) == pytest.approx(z_recall(mask, 8, 20))


def test_label_maps_are_read_in_the_smallest_integer_type():
    assert label_values(np.array([[[0, 3], [117, 2]]], np.int64), "x").dtype == np.uint8
    assert label_values(np.array([[[0, 1000]]], np.float32), "x").dtype == np.uint16
    with pytest.raises(InputError, match="non-integer"):
        label_values(np.array([[[0, 1.5]]], np.float32), "seg.nii.gz")
    with pytest.raises(InputError, match="negative"):
        label_values(np.array([[[0, -1]]], np.int16), "seg.nii.gz")
    ct, label = read_case(labeled_patient("A"))  # real TotalSegmentator map: 117 classes fit a byte
    assert label.dtype == np.uint8 and label.shape == ct.shape and label.max() > 100


def test_prepared_cases_keep_no_ct_voxels_and_map_their_embeddings(tmp_path):
    from nnunet_ape.embed import EmbedSettings
    from nnunet_ape.localize.evaluate import evaluate_organ, prepare
    from nnunet_ape.models.ape import APENet, PRESETS

    model = APENet(PRESETS["tiny"]).eval()
    settings = EmbedSettings(spacing=(6.0, 6.0, 6.0), patch_size=(32, 32, 32), half=True)
    cases = [labeled_patient("A"), labeled_patient("B")]
    in_memory = [prepare(c, model, settings, "cpu") for c in cases]
    mapped = [prepare(c, model, settings, "cpu", store=tmp_path) for c in cases]
    for case in mapped:
        assert isinstance(case.embedding, np.memmap) and case.embedding.dtype == np.float16
        assert case.ct.array.strides == (0, 0, 0)  # geometry only: the CT's voxels were let go
        assert case.label.dtype == np.uint8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A.npy", "B.npy"]
    liver = cases[0].labels["liver"]
    assert evaluate_organ(mapped, liver, shots=1) == evaluate_organ(in_memory, liver, shots=1)
