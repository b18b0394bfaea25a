"""The demo's report (``report.md``) and its contour figure (``contours.png``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_ape.demo.pretraining import loss_summary
from nnunet_ape.demo.segmentation import CROP_ID, SOURCE_ID, TITLES, TRAINER
from nnunet_ape.io import read_volume
from nnunet_ape.plots import contours_png

TARGET_INSIDE = 0.99  # the localizer's crop should hold this much of each organ on every held-out phantom


@dataclass
class Facts:
    """What the demo's steps gave (see :func:`nnunet_ape.demo.run.run_demo`)."""

    iterations: int
    minutes: float
    embedded: dict
    localizer: dict
    manifest: dict
    results: dict
    organs: list[str]
    train: list[str]
    test: list[str]
    seconds: float
    machine: str
    env: dict


def contours_figure(out: Path, source: Path, test: list[str], organs: list[str], results: dict) -> Path:
    """``out/contours.png``: the held-out phantom with the most of the organs, both models' predicted contours
    against the true ones, the crop model's final box."""
    labels = {c: read_volume(source / "labelsTs" / f"{c}.nii.gz") for c in test}
    case = max(test, key=lambda c: (len(np.unique(labels[c].array)), int((labels[c].array > 0).sum())))
    ct = read_volume(source / "imagesTs" / f"{case}_0000.nii.gz")
    predictions = {TITLES[m]: read_volume(out / "predictions" / m / f"{case}.nii.gz").array for m in results}
    boxes = {TITLES["crop"]: np.asarray(results["crop"]["scores"][case]["final_box"])} if "crop" in results else {}
    return contours_png(ct, labels[case].array, predictions, {o: i for i, o in enumerate(organs, 1)}, out / "contours.png",
                        boxes, title=f"held-out phantom {case}")


def write_report(out: Path, facts: Facts) -> str:
    """Write ``out/report.md`` from ``facts``; returns its text."""
    first, last = loss_summary(out / "ape")
    e = facts.embedded
    lines = ["# nnunet-ape demo report", ""]
    if e["iteration"] < facts.iterations:
        lines += [f"**Pretraining was cut short: the {facts.minutes:g}-minute cap ended it after {e['iteration']} of "
                  f"{facts.iterations} iterations** (a busy or slow machine). The map, the localizer and the crops "
                  "below are weaker than the demo's should be; `nnunet-ape demo -o SAME_FOLDER --resume --minutes M` "
                  "continues the pretraining.", ""]
    lines += [
        f"- pretraining: {e['iteration']} iterations, loss {first:.3f} (first 50) -> {last:.3f} (last 50); curve `ape/loss.png`",
        f"- held-out phantom {facts.test[0]} ({'x'.join(map(str, e['shape']))} voxels) embedded in {e['seconds']:.2f} s; "
        f"the map encodes position: R^2 = {e['r2']:.3f} of a linear fit embedding -> position (mm) over the body "
        "(1 = an affine function of position); `heldout_ape.png`",
        *_localizer_lines(facts),
    ]
    if facts.results:
        lines += ["", *_model_table(facts), "", *_target_lines(facts), "", "![contours](contours.png)"]
    lines += ["", *_command_lines(out, facts), "", f"Total time {facts.seconds / 60:.1f} min on {facts.machine}.", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def _localizer_lines(facts: Facts) -> list[str]:
    organs = facts.localizer["organs"]
    chosen = ", ".join(f"{o}: {organs[o]['method']}" for o in facts.organs)
    s = facts.manifest["summary"]
    return [f"- localizer `localizer.json`: {len(facts.train)} training phantoms, every one a shot; method chosen per "
            f"organ on the shots (leave-one-out): {chosen}",
            f"- crop dataset `nnUNet_raw/{facts.manifest['dataset']}`: one crop per phantom around "
            f"{' + '.join(facts.organs)}; source / crop voxels median {s['voxel_ratio']['median']:.1f}x; "
            f"{s['training_cases']} training crops ({_skipped(facts.manifest)} left out: their scan does not show every "
            f"organ; the full-image model trains on all {len(facts.train)})"]


def _skipped(manifest: dict) -> int:
    return sum(c["split"] == "train" for c in manifest.get("skipped_cases", []))


def _inside(facts: Facts, organ: str) -> list[float]:
    scores = facts.results["crop"]["scores"]
    return [c["organs"][organ]["inside_first_box"] for c in scores.values() if organ in c["organs"]]


def _model_table(facts: Facts) -> list[str]:
    header = ["model", "training s", "iterations", "patch", *[f"Dice {o}" for o in facts.organs],
              "predict s / case", "of which localize", "image share predicted: first crop / after regrowth"]
    rows = ["## Localized vs full-image nnU-Net on the held-out phantoms (same training time)", "",
            "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, result in facts.results.items():
        t, scores = result["training"], result["scores"]
        dice = [np.mean([c["organs"][o]["dice"] for c in scores.values() if o in c["organs"]] or [np.nan])
                for o in facts.organs]
        seconds = np.mean([c["seconds"] for c in scores.values()])
        localize = np.mean([c["localize_seconds"] for c in scores.values()])
        first = np.mean([np.prod(np.subtract(*c["first_box"][::-1])) / c["voxels_image"] for c in scores.values()])
        final = np.mean([c["voxels_predicted"] / c["voxels_image"] for c in scores.values()])
        rows.append(f"| {TITLES[model]} | {t['train_seconds']:.0f} | {t['iterations']} | "
                    f"{'x'.join(map(str, t['patch_size']))} | " + " | ".join(f"{d:.3f}" for d in dice) +
                    f" | {seconds:.1f} | {localize:.2f} | {first:.0%} / {final:.0%} |")
    rows += ["", f"Mean over the {len(facts.test)} held-out phantoms that contain each organ. Both models: nnU-Net's own "
             "plans for their dataset with the network shrunk the same way for a CPU (4 stages of 8-64 features, patch "
             "at most 64 per axis), trained for the same wall time with `nnUNetTrainerDemo`, predicted without "
             "test-time mirroring; prediction seconds per case: reading, localizing (crop model: the APE pass and the "
             "boxes), nnU-Net (a crop that grew is predicted again) and pasting back, one process. A crop grows where "
             "the predicted organs touch its faces; a briefly trained model's stray voxels at a face make it grow too. "
             "Minutes of training on phantoms: this shows the pipeline and its cost, not the Dice a real training "
             "reaches; one run, one seed."]
    return rows


def _target_lines(facts: Facts) -> list[str]:
    lines = []
    for organ in facts.organs:
        inside = _inside(facts, organ)
        if not inside:
            continue
        low = min(inside)
        verdict = ("met" if low >= TARGET_INSIDE else
                   f"not met: few shots and a short pretraining give a map that places {organ} too far off on some "
                   "phantoms; `nnunet-ape predict` grows a crop where the prediction touches its face")
        lines.append(f"- localizer on the held-out phantoms: its crop held {np.mean(inside):.3f} of the {organ} on "
                     f"average, at least {low:.3f} (target >= {TARGET_INSIDE} on every phantom: {verdict})")
    regrown = sum(c["regrown"] > 0 for c in facts.results["crop"]["scores"].values())
    lines.append(f"- crops grown during prediction (a predicted organ touched a crop face): {regrown} of {len(facts.test)}")
    return lines


def _command_lines(out: Path, facts: Facts) -> list[str]:
    env = facts.env
    return [
        "What ran (outputs in `logs/`), as you would run it on your own data set:",
        "",
        "```",
        f"export nnUNet_raw={env['nnUNet_raw']} nnUNet_preprocessed={env['nnUNet_preprocessed']} "
        f"nnUNet_results={env['nnUNet_results']} nnUNet_extTrainer=$(nnunet-ape trainers-path)",
        "nnunet-ape localize fit ...   # localizer.json, from an APE model and the training labels",
        f"nnunet-ape crop-dataset -d {SOURCE_ID} -o {CROP_ID} -l {out / 'localizer.json'} --organs {' '.join(facts.organs)}",
        f"nnUNetv2_plan_and_preprocess -d {SOURCE_ID} {CROP_ID} -c 3d_fullres --verify_dataset_integrity",
        f"nnUNetv2_train {CROP_ID} 3d_fullres 0 -tr {TRAINER}   # and {SOURCE_ID} for the full-image model; "
        "nnUNetTrainer for a full training",
        f"nnunet-ape predict -i $nnUNet_raw/Dataset{SOURCE_ID}_*/imagesTs -o predictions/crop -d {CROP_ID} -c 3d_fullres",
        "```",
    ]
