"""Resolve what users type as input: a CT file, a DICOM folder, a folder of CTs, a list file, or an nnU-Net
raw dataset (``DatasetXXX_Name`` folder, its name, or its id under ``$nnUNet_raw``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from nnunet_ape.errors import InputError
from nnunet_ape.io import IMAGE_SUFFIXES, list_images

LIST_SUFFIXES = (".txt", ".csv", ".lst")


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def is_dicom_file(path: Path) -> bool:
    """True when ``path`` carries the DICOM preamble magic ``DICM`` at byte 128."""
    with open(path, "rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"


def _looks_like_dicom_folder(path: Path) -> bool:
    files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
    return bool(files) and is_dicom_file(files[0])


def find_nnunet_raw_dataset(spec: str) -> Path | None:
    """``spec`` as an nnU-Net raw dataset: a folder with ``imagesTr``, or an id / ``DatasetXXX_Name`` under
    ``$nnUNet_raw``. None when it is not one."""
    path = Path(spec)
    if path.is_dir() and (path / "imagesTr").is_dir():
        return path
    raw = os.environ.get("nnUNet_raw")
    if not re.fullmatch(r"\d{1,3}|Dataset\d{3}_\w+", spec):
        return None
    if not raw:
        raise InputError(f"{spec}: looks like an nnU-Net dataset, but nnUNet_raw is not set; export nnUNet_raw=/path/to/nnUNet_raw")
    prefix = f"Dataset{int(spec):03d}_" if spec.isdigit() else spec
    matches = sorted(p for p in Path(raw).glob(f"{prefix}*") if p.is_dir() and (p.name == spec or spec.isdigit()))
    if not matches:
        raise InputError(f"{spec}: no such dataset in nnUNet_raw={raw}")
    if len(matches) > 1:
        raise InputError(f"{spec}: several datasets match in {raw} ({', '.join(m.name for m in matches)}); give the full name")
    return matches[0]


def nnunet_images(dataset: Path, channel: int = 0) -> list[Path]:
    """Channel ``channel`` images of ``imagesTr`` (and ``imagesTs`` if present) of an nnU-Net raw dataset."""
    tag = f"_{channel:04d}"
    images = []
    for sub in ("imagesTr", "imagesTs"):
        folder = dataset / sub
        if folder.is_dir():
            images += [p for p in list_images(folder) if p.is_file() and p.name.split(".")[0].endswith(tag)]
    return images


def resolve_images(spec: str) -> list[Path]:
    """Turn a user's input argument into a non-empty list of CT paths (files or DICOM series folders)."""
    path = Path(spec)
    dataset = find_nnunet_raw_dataset(spec)
    if dataset is not None:
        images = nnunet_images(dataset)
        if not images:
            raise InputError(f"{dataset}: no *_0000 images in imagesTr or imagesTs")
        return images
    if not path.exists():
        raise InputError(f"{spec}: no such file, folder or nnU-Net dataset")
    if path.is_file() and path.name.lower().endswith(LIST_SUFFIXES):
        lines = [line.strip() for line in path.read_text().splitlines()]
        entries = [Path(line) if Path(line).is_absolute() else path.parent / line for line in lines if line and not line.startswith("#")]
        missing = [str(e) for e in entries if not e.exists()]
        if missing:
            raise InputError(f"{path}: lists {len(missing)} missing path(s), first: {missing[0]}")
        if not entries:
            raise InputError(f"{path}: list file is empty")
        return entries
    if path.is_file():
        return [path]
    if _looks_like_dicom_folder(path):
        return [path]
    images = list_images(path)
    if not images:
        raise InputError(f"{path}: folder holds no CT files ({', '.join(IMAGE_SUFFIXES)}) or DICOM series folders")
    return images
