"""Tests for the synthetic CT phantom generator."""

from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ape import phantoms
from nnunet_ape.phantoms import ORGAN_LABELS, make_phantom, write_cohort

SEEDS = range(12)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
RAS_LIKE = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


@lru_cache(maxsize=None)
def _phantom(seed: int) -> tuple[sitk.Image, sitk.Image]:
    return make_phantom(seed)


def _arrays(seed: int) -> tuple[np.ndarray, np.ndarray]:
    ct, lab = _phantom(seed)
    return sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(lab)


def _centroid_mm(lab: sitk.Image, value: int) -> np.ndarray | None:
    """Physical (LPS, mm) centroid of a label, or None if absent."""
    zyx = np.argwhere(sitk.GetArrayFromImage(lab) == value)
    if zyx.size == 0:
        return None
    index_xyz = zyx.mean(axis=0)[::-1]
    return np.array(lab.TransformContinuousIndexToPhysicalPoint(index_xyz.tolist()))


def _seeds_with(direction: tuple[float, ...], *labels: int, count: int = 3) -> list[int]:
    """First ``count`` seeds whose phantom has this direction and all ``labels``."""
    found = []
    for seed in range(40):
        ct, lab = _phantom(seed)
        present = np.unique(sitk.GetArrayFromImage(lab))
        if ct.GetDirection() == direction and np.isin(labels, present).all():
            found.append(seed)
            if len(found) == count:
                break
    return found


def test_deterministic_for_a_seed() -> None:
    a_ct, a_lab = make_phantom(3)
    b_ct, b_lab = make_phantom(3)
    for a, b in ((a_ct, b_ct), (a_lab, b_lab)):
        assert a.GetSize() == b.GetSize()
        assert a.GetSpacing() == b.GetSpacing()
        assert a.GetOrigin() == b.GetOrigin()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


@pytest.mark.parametrize("seed", SEEDS)
def test_ct_and_labels_share_geometry(seed: int) -> None:
    ct, lab = _phantom(seed)
    assert ct.GetPixelID() == sitk.sitkInt16
    assert lab.GetPixelID() == sitk.sitkUInt8
    assert ct.GetSize() == lab.GetSize()
    assert ct.GetSpacing() == lab.GetSpacing()
    assert ct.GetOrigin() == lab.GetOrigin()
    assert ct.GetDirection() == lab.GetDirection()
    assert ct.GetDirection() in (IDENTITY, RAS_LIKE)
    sx, sy, sz = ct.GetSpacing()
    assert sx == sy and 1.5 <= sx <= 3.0 and 2.0 <= sz <= 5.0
    assert np.prod(ct.GetSize()) <= phantoms.MAX_VOXELS
    assert 200.0 <= (ct.GetSize()[2] - 1) * sz <= 455.0  # z field of view, mm
    labels = set(np.unique(sitk.GetArrayFromImage(lab)).tolist())
    assert labels <= {0, *ORGAN_LABELS.values()}
    assert len(labels) > 1  # always some organ in view


@pytest.mark.parametrize("seed", SEEDS)
def test_hu_values_plausible(seed: int) -> None:
    ct, lab = _arrays(seed)
    corners = np.concatenate([ct[:, :4, :4].ravel(), ct[:, -4:, -4:].ravel()])
    assert abs(np.median(corners) + 1000) < 30  # air around the patient
    spine = ct[lab == ORGAN_LABELS["spine"]]
    assert spine.size and np.median(spine) > 300 and ct.max() > 600  # bone
    expected = {"liver": (30, 100), "spleen": (20, 90), "aorta": (120, 260),
                "bladder": (-20, 40), "lung_right": (-950, -650), "lung_left": (-950, -650)}
    for organ, (lo, hi) in expected.items():
        values = ct[lab == ORGAN_LABELS[organ]]
        if values.size > 200:
            assert lo < np.median(values) < hi, organ
    body = (ct > -300).mean()
    assert 0.25 < body < 0.9  # body fills much but not all of the field of view


def test_every_organ_appears_somewhere() -> None:
    seen = set()
    for seed in SEEDS:
        seen |= set(np.unique(_arrays(seed)[1]).tolist())
    assert set(ORGAN_LABELS.values()) <= seen


@pytest.mark.parametrize("direction", [IDENTITY, RAS_LIKE], ids=["identity", "ras_like"])
def test_organs_on_the_correct_physical_side(direction: tuple[float, ...]) -> None:
    L = ORGAN_LABELS
    pairs = [(L["liver"], L["spleen"]), (L["kidney_right"], L["kidney_left"]),
             (L["lung_right"], L["lung_left"])]
    checked = 0
    for right, left in pairs:
        for seed in _seeds_with(direction, right, left):
            lab = _phantom(seed)[1]
            # LPS: patient right has smaller physical x than patient left.
            assert _centroid_mm(lab, right)[0] < _centroid_mm(lab, left)[0], seed
            checked += 1
    assert checked >= 3
    for seed in _seeds_with(direction, L["liver"], L["spine"]):
        lab = _phantom(seed)[1]
        assert _centroid_mm(lab, L["liver"])[0] < _centroid_mm(lab, L["spine"])[0]
        # The spine lies posterior (+y) of the aorta.
        if _centroid_mm(lab, L["aorta"]) is not None:
            assert _centroid_mm(lab, L["aorta"])[1] < _centroid_mm(lab, L["spine"])[1]


def test_lungs_are_superior_to_liver() -> None:
    seeds = _seeds_with(IDENTITY, ORGAN_LABELS["lung_left"], ORGAN_LABELS["liver"], count=2)
    seeds += _seeds_with(RAS_LIKE, ORGAN_LABELS["lung_left"], ORGAN_LABELS["liver"], count=2)
    assert seeds
    for seed in seeds:
        lab = _phantom(seed)[1]
        lung, liver = (_centroid_mm(lab, ORGAN_LABELS[n]) for n in ("lung_left", "liver"))
        assert lung[2] > liver[2]


def test_seeds_give_different_patients_and_scans() -> None:
    sizes = {_phantom(s)[0].GetSize() for s in SEEDS}
    spacings = {_phantom(s)[0].GetSpacing() for s in SEEDS}
    directions = {_phantom(s)[0].GetDirection() for s in SEEDS}
    assert len(sizes) == len(SEEDS)
    assert len(spacings) == len(SEEDS)
    assert directions == {IDENTITY, RAS_LIKE}


def test_generation_time() -> None:
    make_phantom(100)  # warm-up (imports, caches)
    for seed in (101, 102, 103):
        start = time.perf_counter()
        make_phantom(seed)
        assert time.perf_counter() - start < 1.5


def test_write_cohort_layout(tmp_path: Path) -> None:
    out = tmp_path / "Dataset900_Phantoms"
    images = write_cohort(out, n_cases=2, seed=7)
    assert images == [out / "imagesTr" / f"phantom_{i:03d}_0000.nii.gz" for i in range(2)]
    for i, image in enumerate(images):
        label = out / "labelsTr" / f"phantom_{i:03d}.nii.gz"
        ct, lab = sitk.ReadImage(str(image)), sitk.ReadImage(str(label))
        assert ct.GetSize() == lab.GetSize() and ct.GetPixelID() == sitk.sitkInt16
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == {"background": 0, **ORGAN_LABELS}
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz" and meta["name"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temp leftovers


def test_write_cohort_refuses_non_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        write_cohort(out, n_cases=1)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_write_cohort_accepts_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    assert len(write_cohort(out, n_cases=1)) == 1
    assert (out / "dataset.json").is_file()


def test_write_cohort_leaves_nothing_on_error(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def failing(seed: int):
        calls.append(seed)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return make_phantom(seed)

    monkeypatch.setattr(phantoms.cohort, "make_phantom", failing)  # where write_cohort looks it up
    with pytest.raises(RuntimeError):
        write_cohort(tmp_path / "ds", n_cases=3)
    assert list(tmp_path.iterdir()) == []


def test_anatomical_z_puts_the_same_organ_at_the_same_height_in_every_scan(tmp_path: Path) -> None:
    """Scans start at random heights of random patients; anatomical z undoes both, so the liver's mean height agrees
    across cases (template liver centre 405 mm, semi-axis 72 mm) while its height above the scan's first slice
    does not."""
    out = tmp_path / "cohort"
    write_cohort(out, n_cases=4, seed=11)
    heights, slices = [], []
    for i in range(4):
        image = sitk.ReadImage(str(out / "labelsTr" / f"phantom_{i:03d}.nii.gz"))
        lab = sitk.GetArrayFromImage(image)  # [z, y, x], z ascending = superior
        z = phantoms.anatomical_z(11, i)
        assert z.shape == (lab.shape[0],) and np.all(np.diff(z) > 0)  # one height per slice, inferior to superior
        per_slice = (lab == ORGAN_LABELS["liver"]).sum(axis=(1, 2))
        if per_slice.sum():
            heights.append(float((z * per_slice).sum() / per_slice.sum()))
            slices.append(float((np.arange(len(z)) * per_slice).sum() / per_slice.sum()) * image.GetSpacing()[2])
    assert len(heights) >= 2
    assert all(320 < h < 490 for h in heights)
    print(f"liver height: anatomical {np.round(heights)} mm, above the first slice {np.round(slices)} mm")
    assert np.ptp(heights) < 60 and np.ptp(slices) > 2 * np.ptp(heights)
