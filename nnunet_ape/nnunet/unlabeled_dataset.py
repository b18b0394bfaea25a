"""Unlabeled CT as an nnU-Net raw dataset, for APE pretraining with ``nnUNetTrainerAPEPretrain``.

nnU-Net plans and preprocesses only datasets with labels, and its CT normalization takes its intensity window from
the labeled (foreground) voxels. Each case here gets the body as its one label (``body``, 1; :func:`body_mask`): a
valid dataset for ``nnUNetv2_plan_and_preprocess --verify_dataset_integrity``, and a CT normalization window over
the whole body. The pretraining trainer ignores labels; a segmentation model trained on this dataset would learn
the body outline only.

Images that already are NIfTI (``.nii.gz``) are linked, others converted. The dataset is built under
``$nnUNet_raw/.DatasetXXX_Name.partial`` (its ``dataset.json`` first: it names the inputs, so a rerun can tell its
own leftovers from another run's) and renamed when complete; a rerun after a crash skips written cases, and a rerun
after the rename finds the dataset complete. One job per dataset id at a time (a lock, :mod:`nnunet_ape.locks`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_ape.atomic import atomic_path, sweep
from nnunet_ape.errors import InputError
from nnunet_ape.io import Volume, from_canonical, output_name, read_volume, to_canonical, write_volume
from nnunet_ape.localize.body import body_mask
from nnunet_ape.nnunet.raw_dataset import check_id_free, new_dataset_folder, writing_dataset

ENDING = ".nii.gz"
BODY_LABEL = {"background": 0, "body": 1}
MIN_SIZE = 8  # voxels per axis; smaller images cannot hold a network's patch


def case_names(images: list[Path]) -> list[str]:
    """A unique nnU-Net case name per image (its file name without image suffix and channel tag; ``_2``, ``_3``, ...
    appended where names repeat)."""
    names, seen = [], {}
    for image in images:
        base = output_name(image) or "case"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names


def body_label(ct: Volume) -> Volume:
    """The body mask of a CT (HU) as a uint8 label map on the CT's grid (computed in canonical axes, slices axial)."""
    canon, orientation = to_canonical(ct)
    return from_canonical(body_mask(canon.array).astype(np.uint8), orientation, ct)


def write_case(image: Path, name: str, folder: Path) -> None:
    """``imagesTr/NAME_0000.nii.gz`` (link or conversion) and ``labelsTr/NAME.nii.gz`` (body) of one CT."""
    ct = read_volume(image, min_size=MIN_SIZE)
    label = body_label(ct)
    if not label.array.any():
        raise InputError(f"{image}: no voxel above -500 HU; is it a CT in HU?")
    target = folder / "imagesTr" / f"{name}_0000{ENDING}"
    if image.is_file() and image.name.endswith(ENDING):
        target.unlink(missing_ok=True)
        target.symlink_to(image.resolve())
    else:
        write_volume(ct, target)
    write_volume(label, folder / "labelsTr" / f"{name}{ENDING}")  # written last: marks the case done


def dataset_json(images: list[Path], names: list[str]) -> dict:
    """The new dataset's ``dataset.json`` (body labels; the inputs under ``nnunet_ape.sources``)."""
    return {"channel_names": {"0": "CT"}, "labels": BODY_LABEL, "numTraining": len(images), "file_ending": ENDING,
            "nnunet_ape": {"kind": "unlabeled", "labels": "body mask (largest component above -500 HU, holes filled "
                           "per axial slice), for nnUNetTrainerAPEPretrain",
                           "sources": {n: str(i) for i, n in zip(images, names)}}}


def _written_by(folder: Path, dataset: dict) -> bool | None:
    """Whether ``folder``'s dataset.json is ``dataset`` (None when it has none)."""
    path = folder / "dataset.json"
    return json.loads(path.read_text()) == dataset if path.is_file() else None


def build_unlabeled_dataset(images: list[Path], dataset_id: int, name: str) -> Path:
    """Write ``images`` (CT files or DICOM folders) as ``$nnUNet_raw/DatasetXXX_name`` with body labels; returns the
    dataset folder. InputError (nothing renamed into place) for a taken id, an unreadable image, or another job
    writing this id right now."""
    target = new_dataset_folder(dataset_id, name)
    partial = target.parent / f".{target.name}.partial"
    names = case_names(images)
    dataset = dataset_json(images, names)
    with writing_dataset(target, "unlabeled-dataset"):
        if target.is_dir() and _written_by(target, dataset):
            print(f"{target.name}: already complete (written by an earlier run with these inputs)")
            return target
        check_id_free(dataset_id)
        if _written_by(partial, dataset) is False:
            raise InputError(f"{partial}: left by an earlier run with other inputs; rerun with those to resume, or remove it")
        for sub in ("imagesTr", "labelsTr"):
            (partial / sub).mkdir(parents=True, exist_ok=True)
        with atomic_path(partial / "dataset.json") as tmp:
            Path(tmp).write_text(json.dumps(dataset, indent=1))
        todo = [(i, n) for i, n in zip(images, names) if not (partial / "labelsTr" / f"{n}{ENDING}").is_file()]
        if len(todo) < len(images):
            print(f"{len(images) - len(todo)} case(s) written by an earlier run are kept")
        for image, case in tqdm(todo, desc="unlabeled dataset", unit="case", disable=not todo):
            write_case(image, case, partial)
        sweep(partial)  # staging files of killed writers never reach the dataset
        os.replace(partial, target)
    return target
