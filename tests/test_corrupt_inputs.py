"""A corrupt case among many: before writing anything, the command names the case and what is wrong in one line
(every header read up front); never a traceback, never half a dataset under the final name. Jobs with long per-case
work (embed, score, localize predict, predict) check headers up front and skip a case whose voxels turn out unusable
(NaN), with a warning, then name it in one line at the end, the other cases done."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_datasets import HEADNECK, write_headneck_source
from nnunet_ape.cli import main

CASES = ("hn_001", "hn_002", "hn_004")
BAD = "hn_002"

pytestmark = pytest.mark.skipif(not HEADNECK.exists(), reason="head-and-neck dataset not available")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, Path]:
    """Three head-and-neck crops as a raw dataset, and a body-box localizer for the left parotid."""
    from nnunet_ape.cases import cases_from_nnunet
    from nnunet_ape.localize.fit import fit_localizer
    from nnunet_ape.localize.localizer import save_localizer

    base = tmp_path_factory.mktemp("corrupt")
    source = write_headneck_source(base / "Dataset960_Clean", CASES)
    localizer = save_localizer(fit_localizer(cases_from_nnunet(str(source)), {"parotid_left": 4}, None), base / "loc.json")
    return source, localizer


def _float_with_nan(path: Path) -> None:
    image = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[5, 5, 5] = np.nan
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(path), useCompression=True)


def corrupt(source: Path, kind: str) -> tuple[Path, str]:
    """``source`` with case BAD corrupted as ``kind``; returns the bad file and the words the error must say."""
    image, label = source / "imagesTr" / f"{BAD}_0000.nii.gz", source / "labelsTr" / f"{BAD}.nii.gz"
    if kind == "truncated":
        data = image.read_bytes()
        image.write_bytes(data[: len(data) // 2])
        return image, "truncated"
    if kind == "truncated_uncompressed":
        plain = image.with_name(image.name[:-3])
        plain.write_bytes(gzip.decompress(image.read_bytes())[:-1000])
        image.unlink()
        spec = json.loads((source / "dataset.json").read_text())
        spec["file_ending"] = ".nii"
        (source / "dataset.json").write_text(json.dumps(spec))
        for other in source.glob("*/*.nii.gz"):
            sitk.WriteImage(sitk.ReadImage(str(other)), str(other.with_name(other.name[:-3])))
            other.unlink()
        return plain, "truncated"
    if kind == "label_shape":
        read = sitk.ReadImage(str(label))
        sitk.WriteImage(read[:-1, :, :], str(label), useCompression=True)
        return label, "label map does not share the grid"
    if kind == "label_moved":
        read = sitk.ReadImage(str(label))
        read.SetOrigin(tuple(o + 5.0 for o in read.GetOrigin()))
        sitk.WriteImage(read, str(label), useCompression=True)
        return label, "label map does not share the grid"
    if kind == "nan":
        _float_with_nan(image)
        return image, "NaN"
    if kind == "two_components":
        read = sitk.ReadImage(str(image))
        sitk.WriteImage(sitk.Compose(read, read), str(image), useCompression=True)
        return image, "2 components per voxel"
    if kind == "four_d":
        read = sitk.ReadImage(str(image))
        sitk.WriteImage(sitk.JoinSeries([read, read]), str(image), useCompression=True)
        return image, "4D"
    if kind == "channel_files":  # a second channel file for one case only: the dataset names one channel
        shutil.copy(image, image.with_name(f"{BAD}_0001.nii.gz"))
        return image.with_name(f"{BAD}_0001.nii.gz"), "has channel files [0, 1]"
    raise ValueError(kind)


KINDS = ["truncated", "truncated_uncompressed", "label_shape", "label_moved", "nan", "two_components", "four_d", "channel_files"]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith(("reading", "\r"))]
    assert len(lines) == 1 and lines[0].startswith("nnunet-ape: error:") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", ["crop-dataset", "channels-dataset"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_corrupt_case_stops_the_dataset_writers_before_any_output(clean, tmp_path, monkeypatch, capsys, kind, command, bpr_run):
    source, localizer = clean
    raw = tmp_path / "raw"
    broken = raw / "Dataset961_Broken"
    shutil.copytree(source, broken)
    bad, words = corrupt(broken, kind)
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    args = ["-d", "961", "-o", "962", "--device", "cpu"]
    args += ["-l", str(localizer), "--organs", "parotid_left"] if command == "crop-dataset" else ["--bpr-model", str(bpr_run / "checkpoint_final.pt")]
    assert main([command, *args]) == 2
    line = _one_line(capsys)
    assert words in line and f"case '{BAD}'" in line, line
    if kind != "channel_files":  # that one is the dataset's layout: named by its folder
        assert bad.name in line, line
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset961_Broken"]  # nothing written, not even hidden


@pytest.mark.parametrize("kind", ["truncated", "nan", "two_components"])
def test_a_corrupt_image_stops_unlabeled_dataset_before_any_output(clean, tmp_path, monkeypatch, capsys, kind):
    source, _ = clean
    inputs = tmp_path / "inputs"
    shutil.copytree(source / "imagesTr", inputs)
    bad, words = _corrupt_file(inputs / f"{BAD}_0000.nii.gz", kind)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    (tmp_path / "raw").mkdir()
    assert main(["unlabeled-dataset", "-i", str(inputs), "-o", "963"]) == 2
    line = _one_line(capsys)
    assert words in line and f"case '{BAD}'" in line and bad.name in line
    assert list((tmp_path / "raw").iterdir()) == []


def _corrupt_file(path: Path, kind: str) -> tuple[Path, str]:
    """One image file corrupted as ``kind`` (truncated, nan, two_components) in place."""
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, "truncated"
    if kind == "nan":
        _float_with_nan(path)
        return path, "NaN"
    read = sitk.ReadImage(str(path))
    sitk.WriteImage(sitk.Compose(read, read), str(path), useCompression=True)
    return path, "2 components per voxel"


@pytest.mark.parametrize("kind", ["truncated", "two_components"])
@pytest.mark.parametrize("command", ["embed", "score", "localize"])
def test_a_bad_header_stops_the_per_case_commands_before_any_output(clean, tmp_path, capsys, pretrained_run, bpr_run, command, kind):
    source, localizer = clean
    inputs = tmp_path / "inputs"
    shutil.copytree(source / "imagesTr", inputs)
    bad, words = _corrupt_file(inputs / f"{BAD}_0000.nii.gz", kind)
    out = tmp_path / "out"
    args = {"embed": ["embed", "-m", str(pretrained_run / "checkpoint_final.pt")],
            "score": ["score", "-m", str(bpr_run / "checkpoint_final.pt")],
            "localize": ["localize", "predict", "-l", str(localizer)]}[command]
    assert main([*args, "-i", str(inputs), "-o", str(out), "--device", "cpu"]) == 2
    line = _one_line(capsys)
    assert words in line and bad.name in line
    assert not out.exists()


@pytest.mark.parametrize("command", ["score", "localize"])
def test_a_nan_case_is_skipped_with_a_warning_and_named_at_the_end(clean, tmp_path, capsys, bpr_run, command):
    source, localizer = clean
    inputs = tmp_path / "inputs"
    shutil.copytree(source / "imagesTr", inputs)
    _float_with_nan(inputs / f"{BAD}_0000.nii.gz")
    out = tmp_path / "out"
    args = {"score": ["score", "-m", str(bpr_run / "checkpoint_final.pt")], "localize": ["localize", "predict", "-l", str(localizer)]}[command]
    assert main([*args, "-i", str(inputs), "-o", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"warning: case '{BAD}' skipped" in err and "NaN" in err and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("nnunet-ape: error: 1 case(s) skipped, the others are done: hn_002")
    done = sorted(p.name for p in out.iterdir() if p.suffix == ".json")
    suffix = "_bpr.json" if command == "score" else "_boxes.json"
    assert done == [f"{c}{suffix}" for c in CASES if c != BAD]
