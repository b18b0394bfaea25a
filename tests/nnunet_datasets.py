"""Small nnU-Net raw datasets of real CT (patients A and B of ../shared/data) and phantoms, for the nnU-Net tests.

Patients A and B number their labels differently (two versions of TotalSegmentator's scheme), so their maps are
relabeled by organ name into one scheme, as a user building a dataset would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from conftest import DATA, patient, say

ORGANS = ["liver", "spleen"]  # labeled in A, B and the phantoms


def _relabel(seg: sitk.Image, names: dict[str, int]) -> sitk.Image:
    array = sitk.GetArrayFromImage(seg)
    out = np.zeros(array.shape, dtype=np.uint8)
    for i, organ in enumerate(ORGANS, start=1):
        out[array == names[organ]] = i
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(seg)
    return image


def _names(key: str) -> dict[str, int]:
    return {v: int(k) for k, v in json.loads((DATA / f"ts_{key}_labels.json").read_text()).items()}


def write_raw_dataset(folder: Path, phantom_seeds: tuple[int, ...] = (), test_phantoms: tuple[int, ...] = ()) -> Path:
    """``folder`` as an nnU-Net raw dataset: training cases ``A`` (RAS-like), ``B`` (LPS) and phantoms with
    ``phantom_seeds``, test cases phantoms with ``test_phantoms``; labels background 0, liver 1, spleen 2."""
    from nnunet_ape.phantoms import make_phantom

    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for key, stem in (("A", "ts_a_abdomen_pelvis"), ("B", "ts_b_upper_abdomen")):
        (folder / "imagesTr" / f"{key}_0000.nii.gz").symlink_to(patient(key))
        sitk.WriteImage(_relabel(sitk.ReadImage(str(DATA / f"{stem}_seg.nii.gz")), _names(key.lower())),
                        str(folder / "labelsTr" / f"{key}.nii.gz"), useCompression=True)
    for seed in phantom_seeds + test_phantoms:
        ct, seg = make_phantom(seed)
        split = "Tr" if seed in phantom_seeds else "Ts"
        sitk.WriteImage(ct, str(folder / f"images{split}" / f"phantom{seed:03d}_0000.nii.gz"), useCompression=True)
        if split == "Tr":
            array = sitk.GetArrayFromImage(seg)
            keep = np.where(array == 1, 1, np.where(array == 2, 2, 0)).astype(np.uint8)  # phantoms: liver 1, spleen 2
            out = sitk.GetImageFromArray(keep)
            out.CopyInformation(seg)
            sitk.WriteImage(out, str(folder / "labelsTr" / f"phantom{seed:03d}.nii.gz"), useCompression=True)
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, **{o: i for i, o in enumerate(ORGANS, 1)}},
               "numTraining": 2 + len(phantom_seeds), "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=1))
    return folder


def run_tool(env: dict, tag: str, *args: str, expect_ok: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a console script of this environment (``nnUNetv2_*``, ``nnunet-ape``) with ``env``; print its time under
    ``tag``; unless ``expect_ok`` is False, fail the test with its output tail when it fails."""
    began = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / args[0]), *args[1:]], env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - began
    line = f"[{tag}] {' '.join(args[:4])}: {seconds:.0f} s"
    if seconds > 10:  # the long steps of a minutes-long test show on the terminal, not only in its captured output
        say(line)
    else:
        print(line, flush=True)
    if expect_ok:
        assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def tiny_plans(plans_file: Path, *configurations: str) -> None:
    """Shrink the networks and patches of ``configurations`` so that CPU training takes seconds (everything else as
    nnU-Net planned it; a configuration without its own architecture gets a copy of 3d_fullres's)."""
    plans = json.loads(plans_file.read_text())
    for name in configurations:
        config = plans["configurations"][name]
        config.update({"patch_size": [48, 48, 48], "batch_size": 2})
        arch = config.setdefault("architecture", json.loads(json.dumps(plans["configurations"]["3d_fullres"]["architecture"])))
        arch["arch_kwargs"].update({"n_stages": 3, "features_per_stage": [8, 16, 32], "kernel_sizes": [[3, 3, 3]] * 3,
                                    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage": [1, 1, 1],
                                    "n_conv_per_stage_decoder": [1, 1]})
    plans_file.write_text(json.dumps(plans, indent=1))


HEADNECK = DATA.parent / "Dataset901_HeadNeckCT"
HEADNECK_CROP_XYZ = (72, 56, 40)  # voxels around the parotids (about 290 x 220 x 100 mm)


def headneck_crop(case: str, size_xyz: tuple[int, int, int] = HEADNECK_CROP_XYZ) -> tuple[sitk.Image, sitk.Image]:
    """A head-and-neck case's CT and label map (../shared/data/Dataset901_HeadNeckCT) cut to ``size_xyz`` voxels
    around its parotids (the voxels as they are; origin moved to the crop's corner)."""
    image = sitk.ReadImage(str(HEADNECK / "imagesTr" / f"{case}_0000.nii.gz"))
    label = sitk.ReadImage(str(HEADNECK / "labelsTr" / f"{case}.nii.gz"))
    parotids = np.argwhere(np.isin(sitk.GetArrayFromImage(label), (3, 4)))[:, ::-1]  # x, y, z
    centre = (parotids.min(0) + parotids.max(0)) // 2
    lo = [int(np.clip(c - s // 2, 0, n - s)) for c, s, n in zip(centre, size_xyz, image.GetSize())]
    box = tuple(slice(a, a + s) for a, s in zip(lo, size_xyz))
    return image[box], label[box]


def write_headneck_source(folder: Path, train: tuple[str, ...], test: tuple[str, ...] = ()) -> Path:
    """A small raw dataset of head-and-neck crops (:func:`headneck_crop`): ``train`` cases with labels (brainstem 1
    ... mandible 7, as the source), ``test`` cases' CTs in imagesTs."""
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for case in train + test:
        image, label = headneck_crop(case)
        split = "Tr" if case in train else "Ts"
        sitk.WriteImage(image, str(folder / f"images{split}" / f"{case}_0000.nii.gz"), useCompression=True)
        if split == "Tr":
            sitk.WriteImage(label, str(folder / "labelsTr" / f"{case}.nii.gz"), useCompression=True)
    dataset = json.loads((HEADNECK / "dataset.json").read_text())
    dataset.update({"name": folder.name, "numTraining": len(train)})
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=1))
    return folder
