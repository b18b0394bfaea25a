"""CT I/O on real CT: formats, canonical orientation round trips, geometry, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import patient
from nnunet_ape.errors import InputError
from nnunet_ape.inputs import resolve_images
from nnunet_ape.io import Volume, canonical_orientation, from_canonical, read_volume, to_canonical, write_volume


@pytest.mark.parametrize("key", ["A", "B", "B_dicom", "C", "D"])
def test_canonical_round_trip_is_exact_and_keeps_physical_positions(key):
    volume = read_volume(patient(key))
    canon, orientation = to_canonical(volume)
    # canonical: index axes point to patient left, posterior, superior
    assert np.all(np.diag(canon.direction) > 0.99)
    back = from_canonical(canon.array, orientation, volume)
    assert np.array_equal(back.array, volume.array)
    assert back.same_geometry(volume)
    # the same voxel has the same physical position in both index orders
    rng = np.random.default_rng(0)
    for _ in range(5):
        src = rng.integers(0, volume.shape)
        canon_index = np.array([src[p] for p in orientation.perm])
        canon_index = np.where(orientation.flip, np.array(canon.shape) - 1 - canon_index, canon_index)
        assert np.allclose(volume.index_to_physical(src), canon.index_to_physical(canon_index), atol=1e-3)
        assert volume.array[tuple(src)] == canon.array[tuple(canon_index)]


def test_ras_like_patient_a_is_flipped_in_x_and_y():
    volume = read_volume(patient("A"))
    assert np.allclose(np.diag(volume.direction), [-1, -1, 1])
    assert canonical_orientation(volume.direction).flip == (True, True, False)


def test_dicom_series_and_nifti_of_patient_b_agree():
    nifti, dicom = read_volume(patient("B")), read_volume(patient("B_dicom"))
    assert nifti.same_geometry(dicom)
    assert np.array_equal(nifti.array, dicom.array)


def test_write_read_round_trip_preserves_geometry(tmp_path):
    volume = read_volume(patient("A"))
    path = write_volume(volume, tmp_path / "a.nii.gz")
    again = read_volume(path)
    assert again.same_geometry(volume)
    assert np.array_equal(again.array, volume.array)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp_")]


def test_vector_volume_round_trip(tmp_path):
    volume = read_volume(patient("A"))
    vec = volume.with_array(np.random.default_rng(0).normal(size=(*volume.shape, 3)).astype(np.float32))
    image = sitk.ReadImage(str(write_volume(vec, tmp_path / "v.nii.gz")))
    assert image.GetNumberOfComponentsPerPixel() == 3
    assert image.GetSize() == volume.shape
    assert np.allclose(image.GetOrigin(), volume.origin)


def _text_file(path):
    path.write_text("not an image at all")
    return path


def _with_nan() -> np.ndarray:
    array = np.zeros((16, 16, 16), np.float32)
    array[3, 4, 5] = np.nan
    return array


def _write(tmp_path, array, name, spacing=None):
    image = sitk.GetImageFromArray(array)
    if spacing:
        image.SetSpacing(spacing)
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t: _write(t, np.zeros((64, 64), np.int16), "slice.nii.gz"), "2D"),
        (lambda t: _write(t, np.zeros((4, 64, 64), np.int16), "thin.nii.gz"), "too small"),
        (lambda t: _write(t, _with_nan(), "nan.mha"), "NaN"),
        (lambda t: _write(t, _with_nan(), "nan.nii.gz"), "NaN"),  # SimpleITK itself reads NIfTI NaN as 0
        (lambda t: _text_file(t / "fake.nii.gz"), "not a readable image"),
        (lambda t: (t / "empty").mkdir() or t / "empty", "empty"),
        (lambda t: t / "missing.nii.gz", "no such file"),
    ],
)
def test_bad_inputs_raise_one_line_errors_naming_the_file(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(InputError) as info:
        read_volume(path, min_size=8)
    text = str(info.value)
    assert message in text
    assert str(path) in text
    assert "\n" not in text


def test_resolve_images_understands_folders_lists_and_nnunet_datasets(tmp_path, monkeypatch):
    a, c = patient("A"), patient("C")
    listing = tmp_path / "cts.txt"
    listing.write_text(f"{a}\n# comment\n{c}\n")
    assert resolve_images(str(listing)) == [a, c]
    assert resolve_images(str(patient("B_dicom"))) == [patient("B_dicom")]
    raw = tmp_path / "raw"
    dataset = raw / "Dataset042_Tiny"
    (dataset / "imagesTr").mkdir(parents=True)
    for name in ("x_0000.nii.gz", "x_0001.nii.gz", "y_0000.nii.gz"):
        (dataset / "imagesTr" / name).symlink_to(a)
    monkeypatch.setenv("nnUNet_raw", str(raw))
    for spec in ("42", "Dataset042_Tiny", str(dataset)):
        assert [p.name for p in resolve_images(spec)] == ["x_0000.nii.gz", "y_0000.nii.gz"]
    with pytest.raises(InputError, match="no such dataset"):
        resolve_images("43")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(InputError, match="no CT files"):
        resolve_images(str(tmp_path / "nothing"))


def test_volume_rejects_array_of_other_shape():
    volume = Volume(np.zeros((4, 5, 6)), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        volume.with_array(np.zeros((4, 5, 7)))


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    import shutil

    series = patient("B_dicom")
    files = sorted(p for p in series.iterdir() if not p.name.startswith("."))
    complete, gappy = tmp_path / "complete", tmp_path / "gappy"
    shutil.copytree(series, complete)
    shutil.copytree(series, gappy)
    volume = read_volume(complete)
    assert volume.shape[2] == len(files)
    positions = sorted(float(sitk.ReadImage(str(f)).GetOrigin()[2]) for f in files)
    middle = next(f for f in files if float(sitk.ReadImage(str(f)).GetOrigin()[2]) == positions[len(positions) // 2])
    (gappy / middle.name).unlink()  # a slice in the middle of the stack goes missing
    with pytest.raises(InputError, match="uneven slice spacing") as info:
        read_volume(gappy)
    assert "\n" not in str(info.value)
