"""nnU-Net raw datasets as nnU-Net reads them: ``dataset.json``, cases of ``imagesTr`` + ``labelsTr`` and
``imagesTs`` (``CASE_XXXX`` channel files), dataset ids that must be unique over raw, preprocessed and results."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_ape.errors import InputError
from nnunet_ape.inputs import find_nnunet_raw_dataset

REQUIRED_KEYS = ("labels", "channel_names", "numTraining", "file_ending")


@dataclass
class RawCase:
    """One case: its id, channel files in channel order, and the label file (None for test cases)."""

    case_id: str
    images: list[Path]
    label: Path | None = None


@dataclass
class RawDataset:
    """A raw dataset: its folder, ``dataset.json`` and cases (``training`` with labels, ``test`` from imagesTs)."""

    folder: Path
    dataset_json: dict
    training: list[RawCase] = field(default_factory=list)
    test: list[RawCase] = field(default_factory=list)

    @property
    def file_ending(self) -> str:
        return self.dataset_json["file_ending"]

    @property
    def num_channels(self) -> int:
        return len(self.dataset_json["channel_names"])

    @property
    def labels(self) -> dict[str, int]:
        """Label name -> value (region-based entries, lists of values, are left out)."""
        return {k: int(v) for k, v in self.dataset_json["labels"].items() if not isinstance(v, (list, tuple))}


def _channel_files(folder: Path, ending: str) -> dict[str, list[Path]]:
    """Case id -> its ``CASE_XXXX<ending>`` files in channel order (nnU-Net's naming)."""
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(ending))
    found: dict[str, list[tuple[int, Path]]] = {}
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = pattern.fullmatch(entry.name)
        if match:
            found.setdefault(match.group(1), []).append((int(match.group(2)), entry))
    return {case: [p for _, p in sorted(files)] for case, files in found.items()}


def _check_channels(case: str, files: list[Path], n: int, folder: Path) -> None:
    numbers = [int(p.name[len(case) + 1 : len(case) + 5]) for p in files]
    if numbers != list(range(n)):
        raise InputError(f"{folder}: case '{case}' has channel files {numbers} but dataset.json names {n} channel(s) "
                         f"(_0000 .. _{n - 1:04d}); fix the files or channel_names")


def open_raw_dataset(spec: str, need_labels: bool = True) -> RawDataset:
    """Read a raw dataset given as folder, ``DatasetXXX_Name`` or id. Checks (InputError, one line each): it
    exists, has a ``dataset.json`` with nnU-Net's required keys, every case has exactly the channels
    ``channel_names`` lists, every training case has its label file (when ``need_labels``)."""
    folder = find_nnunet_raw_dataset(spec)
    if folder is None:
        raise InputError(f"{spec}: not an nnU-Net raw dataset (no imagesTr); give its folder, DatasetXXX_Name or id")
    json_path = folder / "dataset.json"
    if not json_path.is_file():
        raise InputError(f"{folder}: no dataset.json; nnU-Net needs one (see nnU-Net's dataset_format.md)")
    try:
        dataset_json = json.loads(json_path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{json_path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    missing = [k for k in REQUIRED_KEYS if k not in dataset_json]
    if missing:
        raise InputError(f"{json_path}: lacks the key(s) {', '.join(missing)} that nnU-Net requires")
    dataset = RawDataset(folder, dataset_json)
    n, ending = dataset.num_channels, dataset.file_ending
    if "dataset" in dataset_json:  # explicit file lists instead of imagesTr/labelsTr
        from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

        listed = get_filenames_of_train_images_and_targets(str(folder), json.loads(json_path.read_text()))
        for case, entry in listed.items():
            if len(entry["images"]) != n:
                raise InputError(f"{json_path}: case '{case}' lists {len(entry['images'])} image(s) but channel_names names {n}")
            dataset.training.append(RawCase(case, [Path(p) for p in entry["images"]], Path(entry["label"])))
    else:
        for case, files in _channel_files(folder / "imagesTr", ending).items():
            _check_channels(case, files, n, folder / "imagesTr")
            dataset.training.append(RawCase(case, files, folder / "labelsTr" / f"{case}{ending}"))
    for case, files in _channel_files(folder / "imagesTs", ending).items():
        _check_channels(case, files, n, folder / "imagesTs")
        dataset.test.append(RawCase(case, files))
    if need_labels:
        absent = [c for c in dataset.training if not c.label.is_file()]
        if absent:
            raise InputError(f"{absent[0].label}: label file of training case '{absent[0].case_id}' is missing "
                             f"({len(absent)} case(s) without labels); add them or remove those images")
    if not dataset.training and not dataset.test:
        raise InputError(f"{folder}: no cases (CASE_0000{ending} files) in imagesTr or imagesTs")
    return dataset


def check_raw_cases(dataset: RawDataset, min_size: int = 1) -> None:
    """Every case's files checked before a job writes anything (:func:`nnunet_ape.input_checks.check_cases`: headers,
    truncation, grids, NaN in floating-point images): InputError (one line) naming the first bad case."""
    from nnunet_ape.input_checks import check_cases

    cases = dataset.training + dataset.test
    check_cases([(c.case_id, c.images, c.label) for c in cases], min_size)


def _env_folder(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def datasets_with_id(dataset_id: int) -> list[Path]:
    """Folders named ``DatasetXXX_*`` for this id in ``$nnUNet_raw``, ``$nnUNet_preprocessed`` and ``$nnUNet_results``."""
    found = []
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        root = _env_folder(var)
        if root is not None and root.is_dir():
            found += sorted(p for p in root.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir())
    return found


def new_dataset_folder(dataset_id: int, name: str) -> Path:
    """``$nnUNet_raw/DatasetXXX_name`` for a new dataset. InputError when nnUNet_raw is unset or the id or name is
    not valid; whether the id is free is :func:`check_id_free`'s question (asked under :func:`writing_dataset`'s
    lock)."""
    raw = _env_folder("nnUNet_raw")
    if raw is None:
        raise InputError("nnUNet_raw is not set; export nnUNet_raw=/path/to/nnUNet_raw (the new dataset goes there)")
    if not 1 <= dataset_id <= 999:
        raise InputError(f"-o {dataset_id}: nnU-Net dataset ids have 3 digits (1-999)")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise InputError(f"--name {name}: use letters, digits, '_' and '-' only")
    return raw / f"Dataset{dataset_id:03d}_{name}"


def check_id_free(dataset_id: int) -> None:
    """InputError when the id is taken in raw, preprocessed or results (nnU-Net requires it unique over the three)."""
    taken = datasets_with_id(dataset_id)
    if taken:
        raise InputError(f"dataset id {dataset_id} already exists ({taken[0]}); choose another -o id or remove that folder")


def target_dataset_folder(dataset_id: int, name: str) -> Path:
    """:func:`new_dataset_folder` for an id that must be free (:func:`check_id_free`)."""
    folder = new_dataset_folder(dataset_id, name)
    check_id_free(dataset_id)
    return folder


def dataset_lock(target: Path) -> Path:
    """The lock file of a new dataset's id: ``$nnUNet_raw/.nnunet_ape/DatasetXXX.lock`` (in a hidden folder, which
    nnU-Net's dataset lookup, matching ``DatasetXXX_*`` folders, never sees; lock files stay, as they must: removing
    one while another process waits on it would let two processes hold "the" lock)."""
    return target.parent / ".nnunet_ape" / f"{target.name.split('_')[0]}.lock"


def writing_dataset(target: Path, command: str, part_id: int = 0, num_parts: int = 1):
    """Context manager: this process writes part ``part_id`` of the new dataset ``target``; InputError (a one-line
    refusal) when another process writes that part of a dataset with this id. Byte ``1 + part_id`` of
    :func:`dataset_lock`."""
    from nnunet_ape.locks import locked

    part = f"part {part_id} of {num_parts} of " if num_parts > 1 else ""
    return locked(dataset_lock(target), 1 + part_id,
                  busy=f"{command} -o {target.name[7:10]}: another job is writing {part}{target.name[:10]} right now "
                       f"(it holds {dataset_lock(target)}); wait for it to finish, or choose another -o id")


def assembling_dataset(target: Path):
    """Context manager held while one part assembles the dataset ``target`` (the parts wait for each other): byte 0
    of :func:`dataset_lock`."""
    from nnunet_ape.locks import locked

    return locked(dataset_lock(target), 0)


def dataset_json_for(source: dict, channel_names: list[str], labels: dict[str, int], num_training: int,
                     extra: dict) -> dict:
    """A new ``dataset.json``: ``channel_names`` values are nnU-Net normalization schemes (what it reads; e.g.
    ``CT``, ``noNorm``), ``labels`` consecutive from background 0, the source's ``file_ending`` and reader; our own
    information under the ``nnunet_ape`` key (nnU-Net keeps unknown keys and copies them to its results)."""
    out = {
        "channel_names": {str(i): name for i, name in enumerate(channel_names)},
        "labels": labels,
        "numTraining": num_training,
        "file_ending": source["file_ending"],
    }
    for key in ("overwrite_image_reader_writer", "description", "reference", "licence", "release"):
        if key in source:
            out[key] = source[key]
    out["nnunet_ape"] = extra
    return out
