"""Variants of one labeled CT that a robust model must treat alike: the original, a different field of view (the
lowest slices cut off) and a resampling to another spacing, written as an image/label folder pair. With few
labeled patients they turn a single case into a consistency benchmark for landmark retrieval and slice scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_ape.io import Volume, read_volume, volume_to_image, write_volume
from nnunet_ape.cases import LabeledCase


def _write_pair(folder: Path, name: str, ct: Volume, label: np.ndarray) -> None:
    write_volume(ct, folder / "images" / f"{name}.nii.gz")
    write_volume(Volume(label.astype(np.int16), ct.spacing, ct.origin, ct.direction), folder / "labels" / f"{name}.nii.gz")


def _to_volume(image: sitk.Image) -> Volume:
    array = np.moveaxis(sitk.GetArrayFromImage(image), (0, 1, 2), (2, 1, 0))
    return Volume(array, image.GetSpacing(), image.GetOrigin(), np.array(image.GetDirection()).reshape(3, 3))


def write_case_variants(case: LabeledCase, folder: Path, cut_slices: int = 12, spacing_mm: float = 2.0) -> tuple[Path, Path]:
    """Write ``folder/images`` and ``folder/labels`` holding ``case`` as ``NAME``, ``NAME_fov`` (its first
    ``cut_slices`` slices along the file's third axis removed, geometry kept) and ``NAME_2mm`` (resampled to
    ``spacing_mm`` isotropic: linear for the CT, nearest for labels). Returns the two folders."""
    ct, label = read_volume(case.image), read_volume(case.label, check_finite=False).array
    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(exist_ok=True)
    _write_pair(folder, case.name, ct, label)
    origin = tuple(ct.index_to_physical(np.array([[0, 0, cut_slices]]))[0])
    _write_pair(folder, f"{case.name}_fov", Volume(ct.array[:, :, cut_slices:], ct.spacing, origin, ct.direction), label[:, :, cut_slices:])
    image = volume_to_image(ct)
    size = [max(1, int(n * s / spacing_mm)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    grid = dict(size=size, outputOrigin=image.GetOrigin(), outputSpacing=(spacing_mm,) * 3, outputDirection=image.GetDirection())
    fine = sitk.Resample(image, interpolator=sitk.sitkLinear, defaultPixelValue=-1024, **grid)
    fine_label = sitk.Resample(volume_to_image(ct.with_array(label.astype(np.int16))), interpolator=sitk.sitkNearestNeighbor, **grid)
    _write_pair(folder, f"{case.name}_{spacing_mm:g}mm", _to_volume(fine), _to_volume(fine_label).array)
    return images, labels
