"""``nnunet-ape demo``: the product end to end on built-in synthetic phantoms, no user data and no downloads.

Pretrain APE on the training phantoms, fit a localizer on their labels, crop them, plan, preprocess and train a crop
model and a full-image model with nnU-Net for the same time, predict the held-out phantoms with both through
``nnunet-ape predict``, score them against their labels and draw the contours. Each step keeps what it finished, so
``--resume`` continues an interrupted demo.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

from nnunet_ape.demo import report as demo_report
from nnunet_ape.demo import segmentation as seg
from nnunet_ape.demo.pretraining import DEMO_ITERATIONS, embed_heldout, pretrain
from nnunet_ape.distributed import resolve_device
from nnunet_ape.errors import InputError
from nnunet_ape.phantoms import ORGAN_LABELS, write_cohort

STEPS = 8


def _step(n: int, text: str) -> None:
    print(f"[{n}/{STEPS}] {text}", flush=True)


def run_demo(
    out: Path, cases: int = 12, minutes: float = 10.0, model: str = "tiny", device: str = "auto",
    workers: int = 2, seed: int = 0, resume: bool = False, iterations: int = DEMO_ITERATIONS,
    heldout: int = 3, organs: tuple[str, ...] = ("spleen",), train_minutes: float = 2.5, nnunet: bool = True,
) -> Path:
    """Run the demo into ``out``; returns the path of its report (``out/report.md``).

    ``cases`` training phantoms (APE pretraining for ``iterations``, at most ``minutes``; localizer shots; nnU-Net
    training cases) and ``heldout`` more for testing only. ``organs``: what the localizer finds and both nnU-Net
    models segment. ``train_minutes``: training time of each nnU-Net model. ``nnunet``: False stops after the
    localizer and the crop dataset. Writes ``cohort/`` (all phantoms, nnU-Net raw layout), ``ape/`` (pretraining),
    ``heldout_ape.nii.gz`` / ``.png`` (a held-out phantom's map), ``localizer.json``, nnU-Net's ``nnUNet_raw/``,
    ``nnUNet_preprocessed/``, ``nnUNet_results/``, ``predictions/{crop,full}/``, ``contours.png``, ``logs/`` and
    ``report.md``."""
    out = Path(out)
    if cases < 3:
        raise InputError(f"--cases {cases}: at least 3 training phantoms are needed (pretraining, shots, nnU-Net's split)")
    if heldout < 1:
        raise InputError(f"--heldout {heldout}: at least 1 held-out phantom is needed to score the models")
    unknown = [o for o in organs if o not in ORGAN_LABELS]
    if unknown or not organs:
        raise InputError(f"--organs: the phantoms have no organ '{unknown[0] if unknown else ''}'; choose among "
                         f"{', '.join(ORGAN_LABELS)}")
    if out.exists() and any(out.iterdir()) and not resume:
        raise InputError(f"{out}: already exists; choose a new folder or pass --resume to continue that demo")
    began = time.monotonic()
    device = str(resolve_device(device))
    cohort = out / "cohort"
    if not (cohort / "dataset.json").exists():
        _step(1, f"writing {cases} training and {heldout} held-out synthetic CT phantoms to {cohort}")
        write_cohort(cohort, cases + heldout, seed=seed)
    names = sorted(p.name[: -len("_0000.nii.gz")] for p in (cohort / "imagesTr").glob("*_0000.nii.gz"))
    if len(names) != cases + heldout:
        raise InputError(f"{cohort} holds {len(names)} phantoms, not --cases {cases} + --heldout {heldout}; "
                         "use the numbers of the first run with --resume, or a new folder")
    train, test = names[:cases], names[cases:]
    run = out / "ape"
    _step(2, f"pretraining APE ({model}) for {iterations} iterations (at most {minutes:g} min) on {cases} phantoms")
    checkpoint = pretrain([cohort / "imagesTr" / f"{n}_0000.nii.gz" for n in train], run, iterations, minutes, model,
                          device, workers, seed)
    _step(3, f"embedding held-out phantom {test[0]}")
    embedded = embed_heldout(checkpoint, cohort / "imagesTr" / f"{test[0]}_0000.nii.gz", out, device)
    source = seg.write_source_dataset(cohort, out / "nnUNet_raw", train, test, list(organs))
    _drop_outputs_of_older_model(out, checkpoint)
    _step(4, f"fitting the localizer for {', '.join(organs)} on the {cases} training phantoms (every one a shot)")
    localizer = _fit_localizer(source, out / "localizer.json", list(organs), checkpoint, device)
    env = seg.nnunet_environment(out, device)
    logs = out / "logs"
    _step(5, "nnunet-ape crop-dataset: the training phantoms cropped to the localizer's boxes")
    crops = seg.crop_dataset(env, out / "localizer.json", list(organs), device, logs)
    manifest = json.loads((crops / "crops.json").read_text())
    results: dict = {}
    if nnunet:
        _step(6, "nnU-Net planning and preprocessing of the crop and the full-image dataset (small CPU plans)")
        configurations = seg.plan_and_preprocess(env, logs)
        _step(7, f"training the crop model, then the full-image model, {train_minutes:g} min each")
        for name in seg.MODELS:
            results[name] = {"training": seg.train(env, name, 60 * train_minutes, device, logs),
                             "configuration": configurations[name]}
        _step(8, f"predicting the {heldout} held-out phantoms with both models (nnunet-ape predict), scoring them")
        for name in seg.MODELS:
            folder = seg.predict(env, name, source / "imagesTs", out / "predictions", device, logs)
            results[name]["scores"] = seg.score(folder, source / "labelsTs", list(organs))
        demo_report.contours_figure(out, source, test, list(organs), results)
    text = demo_report.write_report(
        out, demo_report.Facts(
            iterations=iterations, minutes=minutes, embedded=embedded, localizer=localizer, manifest=manifest,
            results=results, organs=list(organs), train=train, test=test, seconds=time.monotonic() - began,
            machine=_machine(device), env=env))
    print(text)
    return out / "report.md"


def _drop_outputs_of_older_model(out: Path, checkpoint: Path) -> None:
    """A resumed demo whose pretraining went on has a newer APE model than its localizer: the localizer and what was
    made from it (the crop dataset, its nnU-Net data and model, the crop predictions) are removed to be made again.
    The full-image model does not depend on it and is kept."""
    from nnunet_ape.checkpoint import file_hash

    path = out / "localizer.json"
    if not path.exists() or json.loads(path.read_text()).get("ape_sha256") == file_hash(checkpoint):
        return
    print("  the APE model changed since the localizer was fitted: fitting it again and remaking the crop model")
    stale = [path, out / "predictions" / "crop", out / "contours.png"]
    stale += [d for root in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
              for pattern in (f"Dataset{seg.CROP_ID}_*", f".Dataset{seg.CROP_ID}_*") for d in (out / root).glob(pattern)]
    for item in stale:
        if item.is_dir():
            shutil.rmtree(item)
        elif item.exists():
            item.unlink()


def _fit_localizer(source: Path, path: Path, organs: list[str], checkpoint: Path, device: str) -> dict:
    """The localizer of ``organs`` fitted on every training case of ``source`` (saved to ``path``; an existing file
    is read instead)."""
    from nnunet_ape.cases import cases_from_nnunet
    from nnunet_ape.localize.fit import fit_localizer
    from nnunet_ape.localize.localizer import save_localizer

    if not path.exists():
        cases = cases_from_nnunet(str(source))
        values = {o: i for i, o in enumerate(organs, start=1)}
        save_localizer(fit_localizer(cases, values, checkpoint, device), path)
    return json.loads(path.read_text())


def _machine(device: str) -> str:
    """The machine in a few words: processor, cores, device."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {device}"
