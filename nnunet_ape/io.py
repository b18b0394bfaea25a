"""CT input and output: one volume type carrying array and geometry, read/write with SimpleITK.

Axis conventions
----------------
``Volume.array`` is indexed ``[x, y, z]`` (SimpleITK index order, *not* SimpleITK's numpy ``[z, y, x]``).
The models work on the *canonical* orientation: axes permuted and flipped so that increasing index
goes to patient Left, Posterior and Superior (LPS, SimpleITK's identity direction). Only
permutations and flips are applied, so going back is exact and lossless.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_ape.atomic import atomic_path
from nnunet_ape.errors import InputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass
class Volume:
    """A 3D (or 3D + channel) image with its physical geometry.

    array: ``(X, Y, Z)`` or ``(X, Y, Z, C)``, index order x, y, z.
    spacing: mm per voxel along x, y, z. origin: physical position (mm, LPS) of voxel (0, 0, 0).
    direction: 3x3 matrix whose columns are the physical directions of the x, y, z index axes.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[:3])  # type: ignore[return-value]

    def with_array(self, array: np.ndarray) -> "Volume":
        """Same geometry, new array of the same spatial shape (X, Y, Z[, C])."""
        if tuple(array.shape[:3]) != self.shape:
            raise ValueError(f"array shape {array.shape[:3]} differs from volume shape {self.shape}")
        return Volume(array, self.spacing, self.origin, np.array(self.direction))

    def index_to_physical(self, index: np.ndarray) -> np.ndarray:
        """Continuous voxel indices ``(..., 3)`` (x, y, z) -> physical points ``(..., 3)`` in mm."""
        scaled = np.asarray(index, dtype=np.float64) * np.asarray(self.spacing)
        return scaled @ np.asarray(self.direction).T + np.asarray(self.origin)

    def same_geometry(self, other: "Volume", atol: float = 1e-4) -> bool:
        """True when size, spacing, origin and direction agree (within ``atol``)."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )


@dataclass(frozen=True)
class Orientation:
    """Permutation and flips that map an array to canonical (LPS) order: ``canon = flip(transpose(a, perm))``."""

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]


def _image_to_volume(image: sitk.Image, name: str) -> Volume:
    if image.GetDimension() != 3:
        raise InputError(f"{name}: image is {image.GetDimension()}D, a 3D CT volume is required")
    array = sitk.GetArrayFromImage(image)  # (z, y, x) or (z, y, x, c)
    array = np.moveaxis(array, (0, 1, 2), (2, 1, 0))
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    return Volume(array, tuple(image.GetSpacing()), tuple(image.GetOrigin()), direction)


def volume_to_image(volume: Volume) -> sitk.Image:
    """Volume -> SimpleITK image with the same geometry (a trailing channel axis becomes a vector pixel)."""
    array = np.moveaxis(volume.array, (0, 1, 2), (2, 1, 0))
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=volume.array.ndim == 4)
    image.SetSpacing([float(s) for s in volume.spacing])
    image.SetOrigin([float(o) for o in volume.origin])
    image.SetDirection([float(d) for d in np.asarray(volume.direction).ravel()])
    return image


def _read_dicom_folder(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        files = [p for p in folder.iterdir() if not p.name.startswith(".")]
        if not files:
            raise InputError(f"{folder}: folder is empty; give a CT file or a DICOM series folder")
        raise InputError(f"{folder}: no DICOM series found in this folder; give a CT file or a DICOM series folder")
    if len(series) > 1:
        raise InputError(f"{folder}: holds {len(series)} DICOM series; put each series in its own folder")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    _check_slice_gaps(reader, len(files), image, folder)
    return image


def _check_slice_gaps(reader: sitk.ImageSeriesReader, n_files: int, image: sitk.Image, folder: Path, tolerance_mm: float = 0.05) -> None:
    """InputError when a DICOM series' slice positions (ImagePositionPatient along the slice normal) are not evenly
    spaced: missing slices or mixed series would silently give a wrong z geometry."""
    if n_files < 3 or image.GetSize()[2] != n_files:
        return
    normal = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    positions = []
    for i in range(n_files):
        if not reader.HasMetaDataKey(i, "0020|0032"):
            return
        positions.append(np.dot([float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")], normal))
    gaps = np.abs(np.diff(np.sort(positions)))
    if gaps.max() - gaps.min() > tolerance_mm:
        raise InputError(f"{folder}: uneven slice spacing ({gaps.min():.2f} to {gaps.max():.2f} mm between slices): slices are "
                         "missing or series are mixed; complete the series or resample it to a regular grid first")


def read_volume(path: str | os.PathLike, min_size: int = 1, check_finite: bool = True) -> Volume:
    """Read a CT (NIfTI, NRRD, MHA/MHD or a DICOM series folder) as a Volume in its stored orientation.

    Raises InputError (one line, naming the file) for: missing path, an empty or non-DICOM folder,
    a file that is not an image, not 3D, fewer than ``min_size`` voxels along any axis, NaN/inf.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    try:
        image = _read_dicom_folder(path) if path.is_dir() else sitk.ReadImage(str(path))
    except InputError:
        raise
    except RuntimeError as error:
        raise InputError(f"{path}: not a readable image ({_first_line(error)})") from None
    volume = _image_to_volume(image, str(path))
    if volume.array.ndim != 3:
        raise InputError(f"{path}: image has {volume.array.shape[3]} components per voxel, a scalar CT is required")
    if min(volume.shape) < min_size:
        raise InputError(
            f"{path}: size {volume.shape} is too small, at least {min_size} voxels per axis are needed"
        )
    if check_finite and np.issubdtype(volume.array.dtype, np.floating) and (
            not np.isfinite(volume.array).all() or _nifti_has_nan(path)):
        raise InputError(f"{path}: contains NaN or infinite values; fix or mask them before use")
    return volume


def _nifti_has_nan(path: Path) -> bool:
    """True for a float NIfTI file holding NaN: SimpleITK's NIfTI reader returns those voxels as 0 without a word,
    so the file's own data are checked (with nibabel, which nnU-Net brings)."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return False
    import nibabel

    data = nibabel.load(str(path)).dataobj
    return np.issubdtype(data.dtype, np.floating) and bool(np.isnan(np.asarray(data)).any())


def read_channels(files: list[Path], min_size: int = 1) -> list[Volume]:
    """Read one case's channel files (channel 0 the CT, checked like :func:`read_volume` with ``min_size``; the
    others may hold any values). InputError (one line) when a channel does not share channel 0's grid."""
    volumes = [read_volume(files[0], min_size=min_size)]
    for path in files[1:]:
        volume = read_volume(path, check_finite=False)
        if not volume.same_geometry(volumes[0], atol=1e-3):
            raise InputError(f"{path}: channel does not share the grid of {files[0]} (size, spacing, origin, direction)")
        volumes.append(volume)
    return volumes


def geometry(volume: Volume) -> dict:
    """A volume's grid as plain JSON values: ``size``, ``spacing``, ``origin`` (x, y, z) and ``direction`` (9, row-major)."""
    return {"size": list(volume.shape), "spacing": [float(s) for s in volume.spacing],
            "origin": [float(o) for o in volume.origin], "direction": np.asarray(volume.direction).ravel().tolist()}


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if "ERROR" in line.upper() or "unable" in line.lower()]
    return (useful or lines or ["unknown error"])[-1][:200]


def write_volume(volume: Volume, path: str | os.PathLike) -> Path:
    """Write a Volume atomically (temporary file in the same folder, then rename); returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        sitk.WriteImage(volume_to_image(volume), tmp, useCompression=True)
    return path


def canonical_orientation(direction: np.ndarray) -> Orientation:
    """Find the axis permutation and flips that bring an image with ``direction`` closest to LPS."""
    direction = np.asarray(direction, dtype=np.float64)
    perm: list[int] = []
    flip: list[bool] = []
    for physical_axis in range(3):
        # index axis whose direction column points most along this physical axis, not taken yet
        scores = [abs(direction[physical_axis, a]) if a not in perm else -1.0 for a in range(3)]
        axis = int(np.argmax(scores))
        perm.append(axis)
        flip.append(bool(direction[physical_axis, axis] < 0))
    return Orientation(tuple(perm), tuple(flip))  # type: ignore[arg-type]


def to_canonical(volume: Volume) -> tuple[Volume, Orientation]:
    """Permute/flip a volume into canonical LPS index order; returns the new volume and the Orientation used.

    The canonical volume describes the same physical voxels: origin and direction are updated so that
    ``index_to_physical`` of corresponding voxels agrees.
    """
    orientation = canonical_orientation(volume.direction)
    perm = list(orientation.perm)
    flip_axes = [a for a in range(3) if orientation.flip[a]]
    spacing = tuple(float(volume.spacing[p]) for p in perm)
    direction = np.asarray(volume.direction)[:, perm].copy()
    # the first canonical voxel is the last source voxel along each flipped axis
    first_index = np.zeros(3)
    for canon_axis, src_axis in enumerate(perm):
        if orientation.flip[canon_axis]:
            first_index[src_axis] = volume.shape[src_axis] - 1
    origin = tuple(volume.index_to_physical(first_index))
    for a in flip_axes:
        direction[:, a] *= -1
    canon = Volume(canonical_array(volume.array, orientation), spacing, origin, direction)  # type: ignore[arg-type]
    return canon, orientation


def canonical_array(array: np.ndarray, orientation: Orientation) -> np.ndarray:
    """An array ``(X, Y, Z[, C])`` on a volume's grid -> the same voxels in canonical order ``(X', Y', Z'[, C])``
    (C-contiguous; no copy when the orientation is the identity and the array is contiguous already), for the
    volume's :class:`Orientation`. The array part of :func:`to_canonical`, for arrays that share a CT's grid (its
    label map) once the CT's orientation is known."""
    array = np.transpose(array, list(orientation.perm) + list(range(3, array.ndim)))
    flip_axes = [a for a in range(3) if orientation.flip[a]]
    if flip_axes:
        array = np.flip(array, axis=flip_axes)
    return np.ascontiguousarray(array)


def from_canonical(array: np.ndarray, orientation: Orientation, reference: Volume) -> Volume:
    """Undo ``to_canonical`` for an array ``(X', Y', Z'[, C])`` in canonical order; geometry from ``reference``."""
    flip_axes = [a for a in range(3) if orientation.flip[a]]
    if flip_axes:
        array = np.flip(array, axis=flip_axes)
    inverse = list(np.argsort(orientation.perm))
    array = np.transpose(array, inverse + list(range(3, array.ndim)))
    return reference.with_array(np.ascontiguousarray(array))


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files (by suffix) and DICOM series sub-folders directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES):
            found.append(entry)
        elif entry.is_dir() and any(f.is_file() for f in entry.iterdir()):
            found.append(entry)
    return found


def output_name(path: str | os.PathLike) -> str:
    """Case name of an image path: file name without image suffix and without nnU-Net's ``_0000`` channel tag."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if len(name) > 5 and name[-5] == "_" and name[-4:].isdigit():
        name = name[:-5]
    return name
