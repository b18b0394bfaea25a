"""A crop model's validation summary restricted to its organs.

nnU-Net scores every label of ``dataset.json``; a crop configuration's network learns only its organs (the other
labels are background in its training crops), so its ``summary.json`` should average over those organs only, as a
full-image model's per-organ Dice would be read. Same layout as nnU-Net's ``summary.json``: ``metric_per_case``,
``mean`` per label, ``foreground_mean`` (mean over the labels of the per-label means).
"""

from __future__ import annotations

import numpy as np


def organ_summary(summary: dict, labels: list[int]) -> dict:
    """nnU-Net's validation ``summary`` (as read from its JSON) restricted to ``labels``."""
    keys = [str(label) for label in labels]
    missing = [k for k in keys if k not in summary["mean"]]
    if missing:
        raise ValueError(f"label {missing[0]} is not in the validation summary (it has {', '.join(summary['mean'])})")
    per_case = [{**case, "metrics": {k: case["metrics"][k] for k in keys}} for case in summary["metric_per_case"]]
    means = {k: summary["mean"][k] for k in keys}
    metrics = next(iter(means.values())).keys()
    foreground = {m: float(np.mean([means[k][m] for k in keys])) for m in metrics}
    return {"metric_per_case": per_case, "mean": means, "foreground_mean": foreground}
