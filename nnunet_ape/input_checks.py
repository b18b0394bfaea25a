"""Checks of a job's input images before it writes anything.

Every header is read up front (SimpleITK's ``ImageFileReader.ReadImageInformation``: no voxels), so that a bad case
among many stops a job with one line naming it before the first output: an unreadable or truncated file, a 2D or
multi-component image, a label map or a channel on another grid. Voxels are read up front only where a header cannot
answer and the job asks for it (``finite``): NaN and inf exist in floating-point images only, so those (rare for CT)
are read; integer images never are.

A truncated ``.nii.gz`` passes a header read (the header sits at the start of the stream). Its gzip trailer gives it
away: the last four bytes of a gzip stream hold the uncompressed size (mod 2**32), which the NIfTI header fixes. Only
when they disagree is the whole stream decompressed, to tell a truncated file from a valid one written in several
gzip members.

Jobs whose per-case work is long (embed, score, localize predict, predict) check headers up front but leave the
voxel check to each case's read: :class:`Skipped` leaves such a case out with a warning and ends the job with one line
naming it, after the other cases are done.
"""

from __future__ import annotations

import gzip
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import SimpleITK as sitk

from nnunet_ape.errors import InputError

GRID_TOLERANCE = 1e-3  # mm (and direction cosines): as read_label and read_channels compare grids
T = TypeVar("T")


@dataclass(frozen=True)
class Header:
    """What an image file's header says: size (x, y, z), spacing, origin, direction (9, row-major), dimension,
    components per voxel and whether its voxels are floating point."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    dimension: int
    components: int
    floating: bool

    def same_grid(self, other: "Header") -> bool:
        return self.size == other.size and all(
            np.allclose(a, b, atol=GRID_TOLERANCE) for a, b in ((self.spacing, other.spacing), (self.origin, other.origin),
                                                                (self.direction, other.direction)))


def read_header(path: Path) -> Header:
    """The header of an image file; InputError (one line) when it is not a readable image."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"{path}: not a readable image") from None
    pixel = reader.GetPixelID()
    floating = pixel in (sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64)
    return Header(tuple(reader.GetSize()), tuple(reader.GetSpacing()), tuple(reader.GetOrigin()), tuple(reader.GetDirection()),
                  reader.GetDimension(), reader.GetNumberOfComponents(), floating)


def nifti_data_size(path: Path) -> int | None:
    """Bytes a NIfTI file holds uncompressed (header, extensions and voxels; from its header), or None when it is
    not NIfTI."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return None
    import nibabel

    header = nibabel.load(str(path)).header
    return int(header.get_data_offset() + np.prod(header.get_data_shape(), dtype=np.int64) * header.get_data_dtype().itemsize)


def _gzip_size(path: Path) -> int | None:
    """The uncompressed size of a gzip file, decompressing all of it; None when the stream ends early."""
    size = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 22):
                size += len(chunk)
    except (EOFError, OSError, zlib.error):
        return None
    return size


def check_complete(path: Path) -> None:
    """InputError when a NIfTI file holds fewer bytes than its header promises (a truncated copy or download)."""
    expected = nifti_data_size(path)
    if expected is None:
        return
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as f:
            f.seek(-4, 2)
            trailer = int.from_bytes(f.read(4), "little")
        if trailer == expected % 2**32:
            return
        actual = _gzip_size(path)
    else:
        actual = path.stat().st_size
    if actual is None or actual < expected:
        raise InputError(f"{path}: truncated (the file ends before the voxels its header announces); copy or convert it again")


def has_nan(path: Path) -> bool:
    """Whether a floating-point image holds NaN or inf voxels (NIfTI read with nibabel: SimpleITK's NIfTI reader
    turns NaN into 0 without a word)."""
    if path.name.lower().endswith((".nii", ".nii.gz")):
        import nibabel

        data = np.asarray(nibabel.load(str(path)).dataobj)
    else:
        data = sitk.GetArrayViewFromImage(sitk.ReadImage(str(path)))
    return bool(np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all())


def check_image(path: Path, min_size: int = 1, finite: bool = False) -> Header | None:
    """One image file's header (and, with ``finite``, its voxels if floating point): readable, complete, a scalar 3D
    image of at least ``min_size`` voxels per axis, without NaN/inf. InputError (one line naming the file) otherwise.
    DICOM series folders are left to their reader (None)."""
    if path.is_dir():
        return None
    header = read_header(path)
    if header.dimension != 3:
        raise InputError(f"{path}: image is {header.dimension}D, a 3D CT volume is required")
    if header.components != 1:
        raise InputError(f"{path}: image has {header.components} components per voxel; give one scalar 3D file per channel "
                         "(CASE_0000, CASE_0001, ...)")
    if min(header.size) < min_size:
        raise InputError(f"{path}: size {header.size} is too small, at least {min_size} voxels per axis are needed")
    check_complete(path)
    if finite and header.floating and has_nan(path):
        raise InputError(f"{path}: contains NaN or infinite values; fix or mask them before use")
    return header


def check_case(images: list[Path], label: Path | None, min_size: int = 1, finite: bool = True) -> None:
    """One case of a dataset: its channel files (channel 0, the CT, also without NaN when ``finite``; the others on
    its grid) and its label map (on the CT's grid, without NaN). InputError naming the file and what is wrong."""
    ct = check_image(images[0], min_size, finite=finite)
    for path in images[1:]:
        channel = check_image(path)
        if ct is not None and channel is not None and not channel.same_grid(ct):
            raise InputError(f"{path}: channel does not share the grid of {images[0]} (size {channel.size} vs {ct.size}, or "
                             "spacing, origin, direction); resample it onto channel 0")
    if label is not None:
        grid = check_image(label, finite=True)
        if ct is not None and grid is not None and not grid.same_grid(ct):
            raise InputError(f"{label}: label map does not share the grid of {images[0]} (size {grid.size} vs {ct.size}, or "
                             "spacing, origin, direction); resample it onto its CT with nearest-neighbour interpolation")


def check_cases(cases: list[tuple[str, list[Path], Path | None]], min_size: int = 1, finite: bool = True) -> None:
    """:func:`check_case` for every ``(case id, channel files, label file or None)`` before a job writes anything;
    InputError (one line) naming the first bad case and what is wrong, and how many others are bad."""
    problems = []
    for case, images, label in cases:
        try:
            check_case(images, label, min_size, finite)
        except InputError as error:
            problems.append((case, str(error)))
    if problems:
        case, what = problems[0]
        more = f" ({len(problems) - 1} more bad case(s): {', '.join(c for c, _ in problems[1:4])}{', ...' if len(problems) > 4 else ''})" \
            if len(problems) > 1 else ""
        raise InputError(f"case '{case}': {what}{more}")


class Skipped:
    """The cases a per-case job leaves out because their files could not be read (an InputError from ``read``):
    each is named in a warning when it happens, and :meth:`finish` ends the job with one line naming them all."""

    def __init__(self) -> None:
        self.cases: list[tuple[str, str]] = []

    def read(self, case: str, read: Callable[[], T]) -> T | None:
        """``read()``, or None (with a warning on stderr) when it raises InputError."""
        try:
            return read()
        except InputError as error:
            print(f"nnunet-ape: warning: case '{case}' skipped: {error}", file=sys.stderr, flush=True)
            self.cases.append((case, str(error)))
            return None

    def finish(self) -> None:
        """InputError (exit code 2) naming the skipped cases, if any."""
        if self.cases:
            names = ", ".join(c for c, _ in self.cases[:5]) + (", ..." if len(self.cases) > 5 else "")
            raise InputError(f"{len(self.cases)} case(s) skipped, the others are done: {names} (first: {self.cases[0][1]}); "
                             "fix them and run the command again (it skips the finished cases)")
