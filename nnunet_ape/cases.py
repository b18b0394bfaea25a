"""Labeled cases: image + label map + organ names, from an nnU-Net raw dataset or two folders.

On the ground floor (I/O) because BPR calibration, localization and the crop datasets all read them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_ape.errors import InputError
from nnunet_ape.inputs import find_nnunet_raw_dataset, nnunet_images
from nnunet_ape.io import Volume, list_images, output_name, read_volume


@dataclass(frozen=True)
class LabeledCase:
    """One labeled CT: ``labels`` maps organ name -> label value in ``label``'s map."""

    name: str
    image: Path
    label: Path
    labels: dict[str, int]


def read_label_names(path: Path) -> dict[str, int]:
    """Organ name -> label value from a dataset.json (``labels``), ``{"name": value}`` or ``{"value": "name"}``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a readable JSON file ({type(error).__name__})") from None
    data = data.get("labels", data)
    if all(isinstance(v, str) for v in data.values()):
        return {name: int(value) for value, name in data.items()}
    return {name: int(value) for name, value in data.items() if not isinstance(value, (list, dict))}


def cases_from_nnunet(spec: str) -> list[LabeledCase]:
    """The training cases (``imagesTr``/``labelsTr``) of an nnU-Net raw dataset (folder, name or id)."""
    dataset = find_nnunet_raw_dataset(spec)
    if dataset is None:
        raise InputError(f"{spec}: not an nnU-Net raw dataset (no imagesTr); give its folder, name or id")
    labels = read_label_names(dataset / "dataset.json")
    ending = json.loads((dataset / "dataset.json").read_text()).get("file_ending", ".nii.gz")
    images = [p for p in nnunet_images(dataset) if p.parent.name == "imagesTr"]
    cases = []
    for image in images:
        label = dataset / "labelsTr" / f"{output_name(image)}{ending}"
        if not label.exists():
            raise InputError(f"{image}: no label file {label}")
        cases.append(LabeledCase(output_name(image), image, label, labels))
    if not cases:
        raise InputError(f"{dataset}: no labeled training cases")
    return cases


def cases_from_folders(images: Path, labels: Path, names: dict[str, int] | None = None) -> list[LabeledCase]:
    """Pair ``images/CASE[_0000].ext`` with ``labels/CASE.ext``; organs named by ``names`` or by label value. Two
    files (a CT and its label map, names free, e.g. TotalSegmentator's ``*_ct`` / ``*_seg``) make one case."""
    images, labels = Path(images), Path(labels)
    if images.is_file() or labels.is_file():
        if not (images.is_file() and labels.is_file()):
            raise InputError(f"--images {images} --labels {labels}: give two folders, or a CT file and its label file")
        name = output_name(images)
        return [LabeledCase(name[:-3] if name.endswith("_ct") else name, images, labels, names or {})]
    for folder in (images, labels):
        if not folder.is_dir():
            raise InputError(f"{folder}: no such folder or file")
    found = {output_name(p): p for p in list_images(labels)}
    cases = []
    for image in list_images(images):
        name = output_name(image)
        if name not in found:
            raise InputError(f"{image}: no label file for case '{name}' in {labels}")
        cases.append(LabeledCase(name, image, found[name], names or {}))
    if not cases:
        raise InputError(f"{images}: no images")
    return cases


def resolve_organs(requested: list[str] | None, labels: dict[str, int]) -> dict[str, int]:
    """Organ name -> value for the requested organs (names, or label values when unnamed); all named ones if None."""
    if not requested:
        chosen = {k: v for k, v in labels.items() if v != 0}
        if not chosen:
            raise InputError("no organ names known; pass --organs with label values or --label-names")
        return chosen
    out = {}
    by_value = {str(v): k for k, v in labels.items()}
    for organ in requested:
        if organ in labels:
            out[organ] = labels[organ]
        elif organ in by_value:
            out[by_value[organ]] = int(organ)
        elif organ.isdigit() and not labels:
            out[organ] = int(organ)
        else:
            known = ", ".join(sorted(k for k, v in labels.items() if v))
            if not known:
                raise InputError(f"unknown organ '{organ}': the labels have no names; name them with --label-names "
                                 f"NAMES.json ({{name: value}}), or give label values as organs")
            raise InputError(f"unknown organ '{organ}'; known organs: {known}")
    return out


def read_case(case: LabeledCase, min_size: int = 8) -> tuple[Volume, np.ndarray]:
    """CT and label array of a case; the label map must share the CT's grid."""
    ct = read_volume(case.image, min_size=min_size)
    return ct, read_label(case.label, ct, case.image)


def read_label(path: Path, ct: Volume, image: Path) -> np.ndarray:
    """The label map at ``path`` as :func:`label_values` ``(X, Y, Z)``; InputError unless it shares the grid of
    ``ct`` (read from ``image``)."""
    label = read_volume(path, check_finite=False)
    if not ct.same_geometry(label, atol=1e-3):
        raise InputError(f"{path}: label map does not share the grid of {image} (size, spacing, origin, direction)")
    return label_values(label.array, path)


def remap_labels(array: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Label map ``array`` with each value ``v`` in ``mapping`` replaced by ``mapping[v]`` and every other value by
    0 (background); uint8, or uint16 when a new value needs it."""
    top = max(mapping.values(), default=0)
    lut = np.zeros(max(int(array.max(initial=0)), max(mapping, default=0)) + 1, dtype=np.uint8 if top < 256 else np.uint16)
    for old, new in mapping.items():
        lut[int(old)] = new
    return lut[array]


def label_values(array: np.ndarray, source: Path | str) -> np.ndarray:
    """A label map ``(X, Y, Z)`` in the smallest unsigned integer type holding its values (uint8 for up to 255
    labels: 1 byte per voxel, where int64 would take 8). ``source`` names the file in errors.

    Raises InputError for NaN, negative or non-integer values (a label map is not an intensity image).
    """
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or not np.equal(np.mod(array, 1), 0).all():
            raise InputError(f"{source}: label map has non-integer values; give a segmentation with integer labels")
    if array.size and array.min() < 0:
        raise InputError(f"{source}: label map has negative values; labels must be 0 (background) or positive integers")
    top = int(array.max()) if array.size else 0
    dtype = np.uint8 if top <= np.iinfo(np.uint8).max else np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32
    return array.astype(dtype, copy=False)
