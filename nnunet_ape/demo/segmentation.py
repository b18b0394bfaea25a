"""The demo's nnU-Net part, run as a user runs it (the same commands, in subprocesses, their output in ``logs/``):
a source dataset of the training phantoms, a crop dataset from the localizer, nnU-Net planning and preprocessing of
both with small CPU plans, a crop model and a full-image model trained for the same wall time, and both predicted on
the held-out phantoms with ``nnunet-ape predict``, scored against their labels."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_ape.cases import remap_labels
from nnunet_ape.crop_geometry import fraction_inside
from nnunet_ape.errors import InputError
from nnunet_ape.io import read_volume
from nnunet_ape.segmentation_scores import dice

SOURCE_ID, CROP_ID = 900, 901
SOURCE_NAME = "DemoPhantoms"
TRAINER = "nnUNetTrainerDemo"
CONFIGURATION = "3d_fullres"
MODELS = {"crop": CROP_ID, "full": SOURCE_ID}  # the crop model trains first
TITLES = {"crop": "localized crop model", "full": "full-image model"}


def source_dataset(raw: Path) -> Path:
    """The demo's source dataset folder in ``raw`` (nnU-Net raw layout)."""
    return raw / f"Dataset{SOURCE_ID}_{SOURCE_NAME}"


def write_source_dataset(cohort: Path, raw: Path, train: list[str], heldout: list[str], organs: list[str]) -> Path:
    """``raw/Dataset900_DemoPhantoms`` from the phantom cohort (nnU-Net raw layout, labels by name in its
    dataset.json): the ``train`` cases in imagesTr/labelsTr, the ``heldout`` ones in imagesTs/labelsTs, labels
    kept for ``organs`` only, renumbered 1..K in that order (so the full-image and the crop model segment the same
    organs). Written beside and renamed into place; an existing one is returned as it is."""
    target = source_dataset(raw)
    if (target / "dataset.json").exists():
        return target
    names = json.loads((cohort / "dataset.json").read_text())["labels"]
    missing = [o for o in organs if o not in names]
    if missing:
        raise InputError(f"--organs: the phantoms have no organ '{missing[0]}'; choose among "
                         f"{', '.join(n for n in names if n != 'background')}")
    partial = raw / f".{target.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    for split, cases in (("Tr", train), ("Ts", heldout)):
        (partial / f"images{split}").mkdir(parents=True)
        (partial / f"labels{split}").mkdir()
        for case in cases:
            shutil.copyfile(cohort / "imagesTr" / f"{case}_0000.nii.gz", partial / f"images{split}" / f"{case}_0000.nii.gz")
            label = sitk.ReadImage(str(cohort / "labelsTr" / f"{case}.nii.gz"))
            kept = remap_labels(sitk.GetArrayFromImage(label), {names[o]: v for v, o in enumerate(organs, start=1)})
            out = sitk.GetImageFromArray(kept)
            out.CopyInformation(label)
            sitk.WriteImage(out, str(partial / f"labels{split}" / f"{case}.nii.gz"), True)
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, **{o: i for i, o in enumerate(organs, 1)}},
               "numTraining": len(train), "file_ending": ".nii.gz", "name": SOURCE_NAME,
               "description": "nnunet-ape demo: synthetic CT phantoms (labelsTs: the held-out phantoms' labels)"}
    (partial / "dataset.json").write_text(json.dumps(dataset, indent=1))
    os.replace(partial, target)
    return target


def nnunet_environment(out: Path, device: str) -> dict:
    """The environment of the demo's nnU-Net commands: nnU-Net's three folders inside ``out``, the APE trainers
    (``nnunet-ape trainers-path``), and nnU-Net's worker processes matched to the machine."""
    from nnunet_ape.cli.trainers_path import trainers_folder

    cores = os.cpu_count() or 1
    workers = str(max(1, min(cores, 4)))
    env = {**os.environ, "nnUNet_raw": str(out / "nnUNet_raw"), "nnUNet_preprocessed": str(out / "nnUNet_preprocessed"),
           "nnUNet_results": str(out / "nnUNet_results"), "nnUNet_extTrainer": str(trainers_folder()),
           "nnUNet_def_n_proc": workers, "nnUNet_n_proc_DA": workers if device != "cpu" else "1"}
    for folder in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[folder]).mkdir(parents=True, exist_ok=True)
    return env


def run_command(argv: list[str], env: dict, log: Path) -> float:
    """Run a console command of this environment (``nnUNetv2_*``, ``nnunet-ape``), printed as ``$ ...``, its output
    appended to ``log``; returns its wall seconds. InputError naming the log and its last line when it fails."""
    print("  $ " + " ".join(argv), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    executable = Path(sys.executable).parent / argv[0]
    began = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(argv)}\n")
        f.flush()
        done = subprocess.run([str(executable if executable.exists() else argv[0]), *argv[1:]], env=env, stdout=f,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        raise InputError(f"'{' '.join(argv[:2])}' failed (exit {done.returncode}): {lines[-1] if lines else ''} "
                         f"(full output: {log}); fix that and run the demo again with --resume")
    return time.perf_counter() - began


def crop_dataset(env: dict, localizer: Path, organs: list[str], device: str, logs: Path) -> Path:
    """``nnunet-ape crop-dataset`` of the source dataset with ``localizer``; returns the crop dataset's folder."""
    raw = Path(env["nnUNet_raw"])
    found = sorted(raw.glob(f"Dataset{CROP_ID}_*"))
    if not found:
        run_command(["nnunet-ape", "crop-dataset", "-d", str(SOURCE_ID), "-o", str(CROP_ID), "-l", str(localizer),
                     "--organs", *organs, "--device", device], env, logs / "crop_dataset.log")
        found = sorted(raw.glob(f"Dataset{CROP_ID}_*"))
    return found[0]


def plan_and_preprocess(env: dict, logs: Path) -> dict[str, dict]:
    """nnU-Net's planning and preprocessing of both datasets (``3d_fullres``), its plans then shrunk for a CPU the
    same way for both (:mod:`nnunet_ape.nnunet.small_plans`), and a split that trains on all but the last training
    case (nnU-Net's validation batches come from that one). Returns per model its shrunk configuration."""
    from nnunet_ape.nnunet.small_plans import shrink_plans

    preprocessed = Path(env["nnUNet_preprocessed"])
    folders = {m: _dataset_folder(preprocessed, i) for m, i in MODELS.items()}
    if any(f is None or not (f / "nnUNetPlans.json").exists() for f in folders.values()):
        run_command(["nnUNetv2_plan_and_preprocess", "-d", str(SOURCE_ID), str(CROP_ID), "-c", CONFIGURATION, "-np",
                     env["nnUNet_def_n_proc"], "--verify_dataset_integrity"], env, logs / "plan_and_preprocess.log")
        folders = {m: _dataset_folder(preprocessed, i) for m, i in MODELS.items()}
    configurations = {}
    for model, folder in folders.items():
        configurations[model] = shrink_plans(folder / "nnUNetPlans.json", CONFIGURATION)  # a no-op when shrunk already
        cases = sorted(p.stem for p in (folder / f"nnUNetPlans_{CONFIGURATION}").glob("*.pkl"))
        (folder / "splits_final.json").write_text(json.dumps([{"train": cases[:-1], "val": cases[-1:]}], indent=1))
    return configurations


def _dataset_folder(root: Path, dataset_id: int) -> Path | None:
    found = sorted(root.glob(f"Dataset{dataset_id}_*"))
    return found[0] if found else None


def train(env: dict, model: str, seconds: float, device: str, logs: Path) -> dict:
    """Train ``model`` (crop or full) with ``nnUNetTrainerDemo`` for ``seconds`` of training; a finished model is
    kept. Returns what the trainer recorded (``training.json``: epochs, iterations, seconds)."""
    from nnunet_ape.nnunet.demo_trainer import RECORD

    folder = _results_folder(env, model)
    if not (folder / "checkpoint_final.pth").exists():
        run_command(["nnUNetv2_train", str(MODELS[model]), CONFIGURATION, "0", "-tr", TRAINER, "-device", _nnunet_device(device)],
                    {**env, "NNUNET_APE_TRAIN_SECONDS": f"{seconds:.1f}"}, logs / f"train_{model}.log")
    return json.loads((folder / RECORD).read_text())


def _results_folder(env: dict, model: str) -> Path:
    dataset = _dataset_folder(Path(env["nnUNet_raw"]), MODELS[model])
    return Path(env["nnUNet_results"]) / dataset.name / f"{TRAINER}__nnUNetPlans__{CONFIGURATION}" / "fold_0"


def _nnunet_device(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def predict(env: dict, model: str, images: Path, out: Path, device: str, logs: Path) -> Path:
    """``nnunet-ape predict`` of the held-out CTs in ``images`` with ``model``'s network (no test-time mirroring) into
    ``out/<model>``; finished cases are kept. Returns that folder."""
    target = out / model
    run_command(["nnunet-ape", "predict", "-i", str(images), "-o", str(target), "-d", str(MODELS[model]), "-c", CONFIGURATION,
                 "-tr", TRAINER, "--disable_tta", "-device", device], env, logs / f"predict_{model}.log")
    return target


def score(predictions: Path, labels: Path, organs: list[str]) -> dict[str, dict]:
    """Per held-out case (the label files in ``labels``): per organ its Dice, and for a crop model the fraction of
    the organ inside the localizer's crop (before any regrowth) and after it; the case's prediction seconds
    (``CASE_boxes.json``: reading, localizing, nnU-Net and pasting back; ``localize_seconds`` of those), the first
    and the final box (low corner included, high excluded; the whole image for a full-image model) and the voxels
    of the final one."""
    out = {}
    for label_file in sorted(labels.glob("*.nii.gz")):
        case = label_file.name[: -len(".nii.gz")]
        truth = read_volume(label_file).array
        pred = read_volume(predictions / f"{case}.nii.gz").array
        report = json.loads((predictions / f"{case}_boxes.json").read_text())
        entry = report["models"][0]
        first = np.asarray(entry.get("attempts", [{"box_voxels": [[0, 0, 0], list(truth.shape)]}])[0]["box_voxels"])
        final = np.asarray(entry.get("box_voxels", [[0, 0, 0], list(truth.shape)]))
        organs_scores = {}
        for value, organ in enumerate(organs, start=1):
            t = truth == value
            if not t.any():
                continue
            organs_scores[organ] = {"dice": dice(pred == value, t), "inside_first_box": fraction_inside(t, first),
                                    "inside_final_box": fraction_inside(t, final)}
        out[case] = {"organs": organs_scores, "seconds": report["seconds"].get("case"),
                     "localize_seconds": report["seconds"].get("localize", 0.0),
                     "voxels_predicted": int(np.prod(final[1] - final[0])), "voxels_image": int(np.prod(truth.shape)),
                     "first_box": first.tolist(), "final_box": final.tolist(), "regrown": entry.get("regrown", 0)}
    return out

