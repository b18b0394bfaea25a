"""The few-label benchmark's report (:mod:`headneck_finetune`, step 5): test Dice per organ over labeled cases x
variant (``WORK/finetune/report.md``), each run's training as its last logged epoch shows it, and the learning
curves (``WORK/finetune/curves.png``); built from the files :func:`headneck_finetune.record` keeps, so a record
rebuilds it after the work folder is gone.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import numpy as np

import bench_headneck_segmentation as seg
import resumable_training as rt
from bench_embed import machine
from finetune_trainers import VARIANTS

NNUNET_ITERATIONS = 1000 * 250  # nnU-Net's default schedule: 1000 epochs of 250 iterations
RUNS = "*_k*_s*"  # WORK/finetune/VARIANT_kK_sS: one fine-tuning run's folder


def run_logs(work: Path) -> list[Path]:
    """Every fine-tuning run's ``WORK/finetune/VARIANT_kK_sS/training_log.jsonl`` (those started so far), sorted."""
    return sorted((work / "finetune").glob(f"{RUNS}/training_log.jsonl"))


def _finished_runs(work: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((work / "finetune").glob(f"{RUNS}/test_scores.json"))]


def report(work: Path) -> str:
    """``WORK/finetune/report.md`` (test Dice per organ: labeled cases x variant, mean over seeds with the spread of
    the organ-mean over seeds; then :func:`training_view`) and ``curves.png``; returns the text."""
    settings = json.loads((work / "finetune" / "settings.json").read_text())
    organs = list(seg.organ_labels())
    runs = _finished_runs(work)
    iterations = settings["epochs"] * settings["iterations_per_epoch"]
    lines = [f"Few-label fine-tuning on the head-and-neck cohort ({work}; report of {date.today().isoformat()}; machine: "
             f"{machine()})", "",
             f"APE pretraining {settings['pretrain_iterations']} iterations inside nnU-Net (training CTs only); each "
             f"fine-tuning run {iterations} iterations ({settings['epochs']} epochs of {settings['iterations_per_epoch']}), "
             f"{100 * iterations / NNUNET_ITERATIONS:.2f}% of nnU-Net's default schedule (1000 epochs of 250). Test Dice on "
             "the 40 held-out cases, no mirroring, source geometry; mean over the cases contouring each organ, then over "
             "seeds; spread: the lowest and highest seed's mean over organs.", "", *_channels_note(work),
             "| labeled cases | variant | seeds | mean Dice (spread) | " + " | ".join(organs) + " |",
             "|---|---|---|---|" + "---|" * len(organs)]
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["labeled"], r["variant"]), []).append(r)
    for (k, variant) in sorted(groups, key=lambda g: (g[0], list(VARIANTS).index(g[1]))):
        members = groups[(k, variant)]
        per_seed = [float(np.nanmean([m["dice"][o] for o in organs])) for m in members]
        spread = f" ({min(per_seed):.3f}-{max(per_seed):.3f})" if len(members) > 1 else ""
        cells = [f"{np.nanmean([m['dice'][o] for m in members]):.3f}" for o in organs]
        lines.append(f"| {k} | {variant} | {len(members)} | {np.mean(per_seed):.3f}{spread} | " + " | ".join(cells) + " |")
    if not runs:
        lines.append("| (no run has finished its test prediction yet) | | | | " + " | ".join("" for _ in organs) + " |")
    lines += ["", *training_view(work, organs)]
    text = "\n".join(lines) + "\n"
    (work / "finetune" / "report.md").write_text(text)
    plot_curves(work, work / "finetune" / "curves.png")
    return text


FOUND = 0.1  # pseudo Dice at which the training view counts an organ as found


def first_found(epochs: list[dict], organs: list[str]) -> str:
    """The organs whose pseudo Dice (nnU-Net's, on its validation patches; ``organs`` in label order) reached
    :data:`FOUND` in the epoch records ``epochs`` (:func:`resumable_training.read_log`), each with the iterations at
    which it first did, in that order: "mandible 1500, spinal_cord 3200"; "none" if none did."""
    found = {}
    for r in epochs:
        for organ, d in zip(organs, r["pseudo_dice"]):
            if d >= FOUND and organ not in found:
                found[organ] = r["iterations"]
    return ", ".join(f"{o} {i}" for o, i in sorted(found.items(), key=lambda x: x[1])) or "none"


def training_view(work: Path, organs: list[str]) -> list[str]:
    """Every run's last logged epoch as report lines (a table): iterations, training and validation loss, nnU-Net's
    pseudo Dice (mean over ``organs``, in label order), the predicted / true organ volume on the validation patches,
    which shows a network that predicts no organ at all (about 0) while its loss, helped by the soft-Dice term on
    patches without an organ, still falls, the epoch's seconds per iteration (learning-curve prediction excluded),
    marked when that invocation compiled the network (``--compile``), and when each organ was first found
    (:func:`first_found`)."""
    logs = run_logs(work)
    if not logs:
        return []
    per_epoch = json.loads((work / "finetune" / "settings.json").read_text())["iterations_per_epoch"]
    rows = []
    for log in logs:
        epochs = rt.read_log(log)
        if not epochs:
            continue
        last = epochs[-1]
        ratio = last.get("organ_volume_ratio")
        started = [r for r in rt.read_log(log, "start") if r["epoch"] <= last["epoch"]]
        compiled = " (compiled)" if started and started[-1].get("compiled") else ""
        rows.append(f"| {log.parent.name} | {last['iterations']} | {last['train_loss']:.3f} | {last['val_loss']:.3f} | "
                    f"{np.nanmean(last['pseudo_dice']):.3f} | {'-' if ratio is None else f'{ratio:.3g}'} | "
                    f"{last['epoch_seconds'] / per_epoch:.2f}{compiled} | {first_found(epochs, organs)} |")
    if not rows:
        return []
    return ["Training's view, each run's last logged epoch (organ volume: the softmax mass of the organ channels over "
            "the true organ voxels on nnU-Net's validation patches; '-' where it was not logged yet):", "",
            "| run | iterations | train loss | val loss | pseudo Dice, mean | organ volume, predicted / true | s / iteration | "
            f"organs found (pseudo Dice >= {FOUND}), first at iterations |", "|---|---|---|---|---|---|---|---|", *rows]


def _channels_note(work: Path) -> list[str]:
    """The channels variant's pretraining, as report lines (none before it ran)."""
    file = work / "finetune" / "ape_standalone.json"
    if not file.exists():
        return []
    info = json.loads(file.read_text())
    return [f"channels: the standalone APE model (CPU recipe) ran {info['iterations']} iterations in the "
            f"{info['budget_seconds'] / 60:.1f} minutes the nnU-Net APE pretraining took; its 3 embedding channels are "
            "input channels beside the CT, trained from random initialisation (`nnUNetTrainerAPEChannels`).", ""]


def plot_curves(work: Path, png: Path) -> None:
    """Learning curves: mean curve Dice over organs against iterations, one panel per number of labeled cases, one
    colour per variant, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[int, list[tuple[str, list[tuple[int, float]]]]] = {}
    for log in run_logs(work):
        variant, rest = log.parent.name.rsplit("_k", 1)
        k = int(rest.split("_s")[0])
        points = [(r["iterations"], float(np.nanmean(list(r["curve"]["dice"].values())))) for r in rt.read_log(log) if "curve" in r]
        if points:
            series.setdefault(k, []).append((variant, points))
    if not series:
        return
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.5), sharey=True, squeeze=False)
    colours = dict(zip(VARIANTS, ("tab:grey", "tab:blue", "tab:orange", "tab:red", "tab:brown", "tab:purple", "tab:green")))
    for ax, k in zip(axes[0], sorted(series)):
        seen = set()
        for variant, points in series[k]:
            ax.plot(*zip(*points), marker="o", ms=3, color=colours[variant], label=None if variant in seen else variant)
            seen.add(variant)
        ax.set_title(f"{k} labeled cases")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("fine-tuning iterations")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("mean Dice, 8 validation cases")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
