"""The head-and-neck segmentation benchmark's report: ``WORK/report.md`` (the model table with training and
prediction cost, the per-organ test scores, how much of each organ the localized stages' final boxes kept) and
``WORK/dice_vs_training_time.png`` (held-out Dice against training hours), from what the benchmark has written so
far; unfinished stages are marked partial.

Run through the benchmark: ``python benchmarks/bench_headneck_segmentation.py report --work WORK``. The functions
take the benchmark module as ``seg`` (its stage definitions), as ``headneck_seg_timing`` does, so
that this module does not import the script it serves.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from types import ModuleType

import numpy as np
import resumable_training as rt

from nnunet_ape.segmentation_scores import mean_per_organ


def stage_logs(seg: ModuleType, work: Path, stage: str) -> dict[str, list[dict]]:
    """``{model name: its training-log records}`` for each model of ``stage``, in order, each record with its
    ``quiet_train_seconds`` (``resumable_training.with_quiet_seconds``)."""
    return {m["name"]: rt.with_quiet_seconds(rt.read_log(m["log"])) for m in seg.stage_models(work, stage)}


def curve_series(logs: dict[str, list[dict]]) -> dict[str, list[tuple[float, float]]]:
    """A stage's learning curve from its models' ``logs`` (:func:`stage_logs`) as ``{organ or "mean": [(training
    hours, Dice), ...]}``: each organ against the training time of the model that segments it; the mean of the
    organs against the stage's total training time (for crop: the groups' times added at the same epoch, where every
    group has a curve point)."""
    per_model = list(logs.values())
    series: dict[str, list[tuple[float, float]]] = {}
    for records in per_model:
        for r in records:
            if "curve" in r:
                for organ, d in r["curve"]["dice"].items():
                    series.setdefault(organ, []).append((r["quiet_train_seconds"] / 3600, d))
    if per_model and all(per_model):
        by_epoch = [{r["epoch"]: r for r in records if "curve" in r} for records in per_model]
        for epoch in sorted(set.intersection(*(set(b) for b in by_epoch))):
            hours = sum(b[epoch]["quiet_train_seconds"] for b in by_epoch) / 3600
            dice = [d for b in by_epoch for d in b[epoch]["curve"]["dice"].values()]
            series.setdefault("mean", []).append((hours, float(np.nanmean(dice))))
    return series


def plot_curves(curves: dict[str, dict[str, list[tuple[float, float]]]], organs: list[str], png: Path) -> None:
    """Held-out (fold-0 curve cases) Dice against training hours per stage (:func:`curve_series`): the mean of the
    organs, then each organ."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 7), sharey=True)
    for ax, organ in zip(axes.flat, ["mean", *organs]):
        for stage, series in curves.items():
            points = series.get(organ, [])
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, label=stage)
        ax.set_title("mean of the organs (stage's total time)" if organ == "mean" else f"{organ} (its model's time)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("training wall time (h)")
    for ax in axes[:, 0]:
        ax.set_ylabel("validation Dice")
    handles = {}
    for ax in axes.flat:  # a stage may have no point in some panels (crop: no mean until every group has a curve)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.suptitle("Held-out Dice (fold-0 validation cases, source geometry) vs training time")
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    fig.legend(handles.values(), handles.keys(), loc="center right")
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _prediction_cells(test: dict, stage: str) -> tuple[str, str, str]:
    """(seconds per case with its split, TTA, peak prediction memory) for the model table."""
    t = list(test["timings"].values())
    mean = lambda k: float(np.mean([x[k] for x in t]))  # noqa: E731
    if "preprocess" in t[0]:
        split = f"{mean('case_seconds'):.1f} (preprocess {mean('preprocess'):.1f} + network {mean('network'):.1f} + export {mean('export'):.1f})"
    elif stage == "channels":
        split = f"{mean('case_seconds'):.1f} (embed {mean('localize'):.1f} + nnU-Net {mean('nnunet'):.1f} + read/write {mean('rest'):.1f})"
    else:
        split = f"{mean('case_seconds'):.1f} (localize {mean('localize'):.1f} + nnU-Net on crops {mean('nnunet'):.1f} + read/paste {mean('rest'):.1f})"
    peaks = [x["peak_rss_gib"] for x in t if x.get("peak_rss_gib") is not None]
    return split, "on" if t[0]["tta"] else "off", f"{max(peaks):.2f}" if peaks else "-"


def model_row(seg: ModuleType, work: Path, stage: str, settings: dict, logs: dict[str, list[dict]], test: dict | None) -> str:
    """One Markdown row of the model table from the stage's ``logs`` (:func:`stage_logs`): training status,
    iterations, seconds, prediction seconds, memory (a stage of several models: their iterations and hours added)."""
    name = stage + ("" if settings["architecture"] == "reduced" else f" ({settings['architecture']} network)")
    if "models_of" in seg.IMPLEMENTED[stage]:
        status = "uses the crop models"
    elif seg.is_trained(work, stage, settings):
        status = "trained"
    else:
        status = "partial: " + ", ".join(f"{m} {len(r)}/{settings['epochs']}" for m, r in logs.items()) + " epochs"
    records = [r for rs in logs.values() for r in rs]
    iterations = sum(rs[-1]["iterations"] for rs in logs.values() if rs)
    cells = [name, status, "-", "-", "-", "-", "-", "-", "-"]
    if records:
        cells[2] = str(iterations) if len(logs) == 1 else " + ".join(f"{m} {rs[-1]['iterations'] if rs else 0}" for m, rs in logs.items())
        quiet = [r for r in records if rt.is_quiet(r)]
        per_epoch = settings["iterations_per_epoch"]
        cells[3] = (f"{sum(r['epoch_seconds'] for r in quiet) / (len(quiet) * per_epoch):.2f}" if quiet else "-") + \
            ("" if len(quiet) == len(records) else f" ({len(quiet)} of {len(records)} epochs quiet)")
        cells[4] = f"{sum(rs[-1]['quiet_train_seconds'] for rs in logs.values() if rs) / 3600:.2f}"
    train_rss = f"{max(r['peak_rss_gib'] for r in records):.2f}" if records else "-"
    cells[8] = f"{train_rss} / -"
    if test and test["cases"]:
        cells[5] = f"{len(test['cases'])}" + ("" if test.get("complete") and len(test["cases"]) == seg.TEST_CASES_N else " (partial)")
        cells[6], cells[7], peak = _prediction_cells(test, stage)
        cells[8] = f"{train_rss} / {peak}"
    return "| " + " | ".join(cells) + " |"


def box_table(tests: dict[str, dict], organs: list[str]) -> list[str]:
    """Markdown lines: per organ and localized stage, whether prediction lost part of it: the lowest fraction of
    the organ inside its model's final box, the cases below 1 and below 0.99, and the cases whose prediction still
    touched a crop face after regrowth."""
    stages = [s for s in tests if "organ_in_box" in tests[s]]
    if not stages:
        return []
    lines = ["| organ | " + " | ".join(f"{s}: min in box / cases < 1 / < 0.99 / faces still touched" for s in stages) + " |",
             "|---|" + "---|" * len(stages)]
    for organ in organs:
        cells = []
        for s in stages:
            fractions = [f[organ] for f in tests[s]["organ_in_box"].values() if organ in f]
            touched = sum(1 for t in tests[s]["timings"].values() for b in t["boxes"].values()
                          if organ in b["organs"] and b["still_touched_faces"])
            cells.append(f"{min(fractions):.3f} / {sum(f < 1 for f in fractions)} / {sum(f < 0.99 for f in fractions)} / {touched}"
                         if fractions else "-")
        lines.append(f"| {organ} | " + " | ".join(cells) + " |")
    return lines


def organ_table(seg: ModuleType, tests: dict[str, dict], organs: list[str]) -> list[str]:
    """Markdown lines of the per-organ test table: per stage Dice and each NSD, mean over the cases contouring the
    organ (their number per stage in brackets where the stages differ)."""
    metrics = ["dice"] + [f"nsd_{t:g}mm" for t in next(iter(tests.values()))["nsd_mm"]]
    means = {(s, m): mean_per_organ(test["scores"], organs, m) for s, test in tests.items() for m in metrics}
    lines = ["| organ | test cases | " + " | ".join(f"{s} {m.replace('_', ' ')}" for s in tests for m in metrics) + " |",
             "|---|---|" + "---|" * (len(tests) * len(metrics))]
    for organ in organs:
        counts = sorted({means[(s, "dice")][organ][1] for s in tests})
        lines.append(f"| {organ} | {'/'.join(map(str, counts))} | "
                     + " | ".join(f"{means[(s, m)][organ][0]:.3f}" for s in tests for m in metrics) + " |")
    lines.append("| mean of the organs | | " + " | ".join(f"{np.nanmean([means[(s, m)][o][0] for o in organs]):.3f}"
                                                        for s in tests for m in metrics) + " |")
    return lines


def report(seg: ModuleType, work: Path, stages: list[str]) -> str:
    """Markdown tables of every stage that has started (partial ones marked): the models (training and prediction
    cost), the per-organ test scores and, for localized stages, how much of each organ its final box kept; writes
    ``WORK/report.md`` and the learning-curve PNG; returns the text."""
    organs = list(seg.organ_labels())
    prepared = json.loads((work / "prepared.json").read_text()) if (work / "prepared.json").exists() else {}
    lines = [f"Head-and-neck segmentation benchmark ({work}, report of {date.today().isoformat()}; machine: {seg.machine()})",
             "", f"{prepared.get('train_cases', '?')} training cases (fold 0: nnU-Net's split), {prepared.get('test_cases', '?')} "
             f"test cases. nnU-Net's plan for 3d_fullres: {prepared.get('planned_3d_fullres', '?')}. CPU reduction: "
             f"{prepared.get('reduced_3d_fullres', '?')}.", ""]
    coarse = work / "coarse" / "prepared.json"
    if coarse.exists():
        info = json.loads(coarse.read_text())
        lines += [f"Coarse model: nnU-Net's plan at {info['factor']}x the spacing: {info['planned']}; trained: {info['trained']}.", ""]
    crops = work / "crop" / "prepared.json"
    if crops.exists():
        info = json.loads(crops.read_text())
        lines += ["Crop models (one per organ group; localizer " + info["localizer"] + "):", ""]
        lines += [f"- {g}: {', '.join(d['organs'])}; median crop {d['median_crop_voxels']} voxels; planned: {d['planned']}; "
                  f"trained: {d['trained']}" for g, d in info["groups"].items()] + [""]
    channels = work / "channels" / "prepared.json"
    if channels.exists():
        info = json.loads(channels.read_text())
        lines += [f"Channels model: {info['configuration']} (CT + APE x, y, z + BPR; APE {info['ape_model']}, BPR "
                  f"{info['bpr_model']}); trained: {info['trained']}.", ""]
    lines += ["| model | status | iterations | s / iteration | training h | test cases | prediction s / case | TTA | "
              "peak RSS GiB training / prediction |", "|---|---|---|---|---|---|---|---|---|"]
    curves, tests = {}, {}
    for stage in stages:
        settings_file = work / seg.IMPLEMENTED.get(stage, {}).get("models_of", stage) / "settings.json"
        if stage not in seg.IMPLEMENTED or not settings_file.exists():
            continue
        settings = json.loads(settings_file.read_text())
        logs = stage_logs(seg, work, stage)
        curves[stage] = curve_series(logs)
        score_file = work / stage / "test_scores.json"
        test = json.loads(score_file.read_text()) if score_file.exists() else None
        if test and test["cases"]:
            tests[stage] = test
        if "models_of" in seg.IMPLEMENTED[stage] and not test:
            continue
        lines.append(model_row(seg, work, stage, settings, logs, test))
    lines += ["", "s / iteration: wall seconds of nnU-Net's epochs (training iterations and its validation batches) per "
              "training iteration, over the epochs that ran without other CPU work beside them (`is_quiet`); training h: the "
              "epochs' seconds added over every invocation and every model of the stage, an epoch that shared the CPU "
              "counted as its model's mean quiet epoch (`with_quiet_seconds`; learning-curve predictions and start-up "
              "not included). Prediction seconds per case: one process, cases "
              "in sequence, model loading not included; full: nnU-Net's preprocessing + network + export; crop/oracle: "
              "`nnunet-ape predict`'s APE pass and boxes + nnU-Net on each crop (its preprocessing, network, "
              "export, regrowth) + reading the CT and pasting back."]
    if tests:
        lines += ["", "Test cases, per organ: mean over the cases whose labels contour the organ (source geometry):", "",
                  *organ_table(seg, tests, organs)]
        boxes = box_table(tests, organs)
        if boxes:
            lines += ["", "Localized prediction, per organ: fraction of the organ (test labels) inside its model's final "
                      "box (after regrowth):", "", *boxes]
    text = "\n".join(lines) + "\n"
    (work / "report.md").write_text(text)
    if any(series for series in curves.values()):
        plot_curves({s: c for s, c in curves.items() if c}, organs, work / "dice_vs_training_time.png")
    return text
