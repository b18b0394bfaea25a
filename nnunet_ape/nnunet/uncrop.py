"""Paste nnU-Net predictions of crop datasets back onto the source CTs.

A prediction folder written by ``nnUNetv2_predict`` holds the model's ``dataset.json``, whose ``nnunet_ape`` key
names the crop dataset; its manifest (``crops.json``) gives each case's box and source geometry. Each predicted
crop is put back at its box into a label map with the source's exact size, spacing, origin and direction, and its
labels are mapped to the source dataset's values.

Overlaps, when several crop datasets are pasted together: the inputs are taken in the order given, and a voxel
keeps the label of the first input that labels it (later inputs fill only voxels still background). Put the
prediction you trust most first.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_ape.atomic import atomic_path, remove_leftovers
from nnunet_ape.crop_geometry import box_shape, paste
from nnunet_ape.errors import InputError
from nnunet_ape.io import Volume, read_volume, write_volume
from nnunet_ape.cases import remap_labels
from nnunet_ape.nnunet.crop_dataset import MANIFEST, MANIFEST_FORMAT


@dataclass
class PredictionSet:
    """One prediction folder with the manifest of the crop dataset its model was trained on."""

    folder: Path
    manifest: dict

    @property
    def file_ending(self) -> str:
        return self.manifest["file_ending"]

    def prediction(self, case: str) -> Path:
        return self.folder / f"{case}{self.file_ending}"


def find_manifest(folder: Path, manifest: Path | None = None, kinds: tuple[str, ...] = ("crops",)) -> dict:
    """The manifest of a prediction (or results) folder's dataset: ``manifest`` if given, else the one its
    ``dataset.json`` names (the dataset in ``$nnUNet_raw``), for datasets of ``kinds`` (``crops``, ``channels``).
    InputError when none can be found."""
    if manifest is None:
        dataset_json = folder / "dataset.json"
        if not dataset_json.is_file():
            raise InputError(f"{folder}: no dataset.json (nnUNetv2_predict writes one); pass the crop dataset's crops.json with --manifest")
        info = json.loads(dataset_json.read_text()).get("nnunet_ape")
        if not info or info.get("kind") not in kinds:
            raise InputError(f"{folder}: predictions of a model not trained on an nnunet-ape crop dataset; nothing to paste back")
        raw = os.environ.get("nnUNet_raw")
        if not raw:
            raise InputError("nnUNet_raw is not set; export it (the crop dataset's crops.json is found there) or pass --manifest")
        manifest = Path(raw) / info["dataset"] / info.get("manifest", MANIFEST)
    if not Path(manifest).is_file():
        raise InputError(f"{manifest}: crop manifest not found; pass its path with --manifest")
    content = json.loads(Path(manifest).read_text())
    if content.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{manifest}: not an {MANIFEST_FORMAT} manifest")
    return content


def open_predictions(folders: list[Path], manifests: list[Path] | None = None) -> list[PredictionSet]:
    """Prediction folders with their manifests (``manifests``, if given, one per folder)."""
    if manifests and len(manifests) != len(folders):
        raise InputError(f"--manifest: give one per input folder ({len(folders)}), or none")
    sets = []
    for i, folder in enumerate(folders):
        if not Path(folder).is_dir():
            raise InputError(f"{folder}: no such prediction folder")
        manifest = find_manifest(Path(folder), manifests[i] if manifests else None)
        sets.append(PredictionSet(Path(folder), manifest))
    sources = {s.manifest["source_dataset"] for s in sets}
    if len(sources) > 1:
        raise InputError(f"the inputs come from different source datasets ({', '.join(sorted(sources))}); paste each source on its own")
    return sets


def source_volume(entry: dict, array: np.ndarray) -> Volume:
    """A Volume with the source geometry recorded in a manifest entry."""
    s = entry["source"]
    return Volume(array, tuple(s["spacing"]), tuple(s["origin"]), np.asarray(s["direction"], dtype=np.float64).reshape(3, 3))


def paste_case(entry: dict, prediction: Path, to_source: dict[str, int]) -> np.ndarray:
    """One predicted crop -> a label map ``(X, Y, Z)`` uint8/uint16 on the source grid with source label values.
    InputError when the prediction is not on the crop's grid."""
    predicted = read_volume(prediction, check_finite=False)
    box = np.asarray(entry["box_voxels"])
    if predicted.shape != box_shape(box):
        raise InputError(f"{prediction}: size {predicted.shape} differs from the crop of case '{entry['case']}' {box_shape(box)}; "
                         "is it a prediction of this crop dataset?")
    source = source_volume(entry, np.zeros(entry["source"]["size"], dtype=np.uint8))
    expected_origin = source.index_to_physical(box[0].astype(np.float64))
    if not np.allclose(predicted.origin, expected_origin, atol=1e-2 * min(source.spacing)):
        raise InputError(f"{prediction}: origin {np.round(predicted.origin, 2).tolist()} is not where the crop of case "
                         f"'{entry['case']}' starts {np.round(expected_origin, 2).tolist()}")
    values = np.rint(predicted.array).astype(np.int64)
    return paste(remap_labels(values, {int(t): int(v) for t, v in to_source.items()}), box, tuple(entry["source"]["size"]))


def uncrop(sets: list[PredictionSet], output: Path, overwrite: bool = False) -> list[Path]:
    """Paste every case found in the prediction folders into ``output/CASE<ending>`` (source geometry and label
    values, inputs merged in order, see the module docstring). Existing outputs are kept unless ``overwrite``.
    Returns the written paths."""
    cases: dict[str, list[tuple[PredictionSet, dict]]] = {}
    for s in sets:
        for entry in s.manifest["cases"]:
            if s.prediction(entry["case"]).is_file():
                cases.setdefault(entry["case"], []).append((s, entry))
    if not cases:
        raise InputError(f"no predictions of the manifests' cases in {', '.join(str(s.folder) for s in sets)} "
                         f"(expected files like CASE{sets[0].file_ending})")
    written = []
    if output.is_dir():
        remove_leftovers(output)  # staging files of killed runs
    for case, found in tqdm(sorted(cases.items()), desc="uncrop", unit="case"):
        target = output / f"{case}{found[0][0].file_ending}"
        if target.exists() and not overwrite:
            continue
        merged = None
        for s, entry in found:
            pasted = paste_case(entry, s.prediction(case), s.manifest["target_to_source_label"])
            if merged is None:
                merged = pasted
            else:
                if merged.dtype != pasted.dtype:
                    merged, pasted = merged.astype(np.uint16), pasted.astype(np.uint16)
                free = merged == 0
                merged[free] = pasted[free]
        write_volume(source_volume(found[0][1], merged), target)
        written.append(target)
    with atomic_path(output / "uncrop.json") as tmp:
        Path(tmp).write_text(json.dumps({"inputs": [str(s.folder) for s in sets], "rule": "first input wins where labels overlap",
                                         "cases": sorted(cases)}, indent=1))
    return written
