"""``evaluate bpr``: how well slice scores find landmark slices, and how monotonic they are, for one or more models
measured on the same labeled cases in one run (Fei and McMillan's trunk comparison).

Landmark error, leave one case out: a landmark's reference score is its mean cleaned score over the other cases
that show it; on the held-out case the predicted slice is the one whose cleaned score is closest to it; the error
is the distance to the true landmark slice, in slices and in mm. Monotonicity: the fraction of neighbouring body
slices whose unprocessed score rises from feet to head, and Spearman's rho of score against z.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from tqdm import tqdm

from nnunet_ape.bpr.calibration import CaseScores, score_case
from nnunet_ape.bpr.scoring import load_bpr_model
from nnunet_ape.cases import LabeledCase


def landmark_errors(scored: list[CaseScores]) -> dict[str, list[tuple[str, float, float]]]:
    """Leave-one-case-out errors per landmark: ``(case, error in slices, error in mm)`` for every case showing it
    while at least one other case does too."""
    errors: dict[str, list[tuple[str, float, float]]] = {}
    for held in scored:
        for name, true_slice in held.landmarks.items():
            others = [c for c in scored if c is not held and name in c.landmarks]
            if not others:
                continue
            reference = np.mean([np.interp(c.landmarks[name], np.arange(len(c.cleaned)), c.cleaned) for c in others])
            distance = np.where(np.isfinite(held.cleaned), np.abs(held.cleaned - reference), np.inf)
            error = abs(int(np.argmin(distance)) - true_slice)
            errors.setdefault(name, []).append((held.name, float(error), float(error * held.z_spacing)))
    return errors


def monotonicity(case: CaseScores) -> tuple[float, float]:
    """(fraction of neighbouring body slices whose raw score rises, Spearman rho of raw score against slice index)."""
    raw = case.raw[case.body]
    if raw.size < 3:
        return float("nan"), float("nan")
    return float((np.diff(raw) > 0).mean()), float(spearmanr(np.arange(raw.size), raw).correlation)


def evaluate_models(checkpoints: list[Path], cases: list[LabeledCase], landmarks: list[str], device: str = "cpu") -> dict:
    """Every model on the same cases: per model its trunk, landmark MAE (slices, mm) overall and per landmark, and
    monotonicity; JSON-ready."""
    models = {}
    for path in tqdm(checkpoints, desc="models", unit="model"):
        model, state = load_bpr_model(path)
        scored = [score_case(model, case, landmarks, device) for case in cases]
        errors = landmark_errors(scored)
        flat = [e for rows in errors.values() for e in rows]
        mono = np.array([monotonicity(c) for c in scored])
        models[_model_name(path, state, models)] = {
            "checkpoint": str(path),
            "trunk": state["model_config"]["trunk"],
            "iterations": state.get("iteration"),
            "pairs": len(flat),
            "mae_slices": float(np.mean([e[1] for e in flat])) if flat else None,
            "mae_mm": float(np.mean([e[2] for e in flat])) if flat else None,
            "rising_fraction": float(np.nanmean(mono[:, 0])),
            "spearman": float(np.nanmean(mono[:, 1])),
            "landmarks": {name: {"cases": len(rows), "mae_slices": float(np.mean([r[1] for r in rows])),
                                 "mae_mm": float(np.mean([r[2] for r in rows]))} for name, rows in errors.items()},
        }
    return {"cases": [c.name for c in cases], "landmarks_requested": landmarks, "models": models}


def _model_name(path: Path, state: dict, taken: dict) -> str:
    name = f"{state['model_config']['trunk']} ({Path(path).parent.name}/{Path(path).name})"
    return name if name not in taken else f"{name} #{len(taken)}"


def markdown_report(result: dict) -> str:
    """Two tables: models compared (MAE, monotonicity), and MAE in mm per landmark and model."""
    models = result["models"]
    lines = [f"# BPR evaluation: {len(result['cases'])} cases, leave-one-case-out landmark slices", "",
             "| model | trunk | iterations | landmark-case pairs | MAE (slices) | MAE (mm) | rising neighbours | Spearman |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        mae = f"{m['mae_slices']:.2f} | {m['mae_mm']:.1f}" if m["pairs"] else "- | -"
        lines.append(f"| {name} | {m['trunk']} | {m['iterations']} | {m['pairs']} | {mae} | {m['rising_fraction']:.3f} | {m['spearman']:.3f} |")
    landmarks = sorted({lm for m in models.values() for lm in m["landmarks"]}, key=result["landmarks_requested"].index)
    if landmarks:
        lines += ["", "MAE in mm per landmark (cases):", "", "| landmark | " + " | ".join(models) + " |", "|" + "---|" * (len(models) + 1)]
        for lm in landmarks:
            cells = [f"{m['landmarks'][lm]['mae_mm']:.1f} ({m['landmarks'][lm]['cases']})" if lm in m["landmarks"] else "-" for m in models.values()]
            lines.append(f"| {lm} | " + " | ".join(cells) + " |")
    else:
        lines += ["", "No landmark is shown by two or more cases: add labeled cases (vertebrae, organ edges) to measure MAE."]
    lines += ["", "Predicted slice: the one whose cleaned score is closest to the landmark's mean score on the other "
              "cases. Rising neighbours: fraction of neighbouring body slices whose unprocessed score increases feet to head.", ""]
    return "\n".join(lines)


def write_report(result: dict, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write OUT/bpr_evaluation.json and .md atomically; returns both paths."""
    import json

    from nnunet_ape.atomic import atomic_path

    out = Path(out)
    paths = out / "bpr_evaluation.json", out / "bpr_evaluation.md"
    with atomic_path(paths[0]) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1))
    with atomic_path(paths[1]) as tmp:
        Path(tmp).write_text(markdown_report(result))
    return paths
