"""CSV training log that survives resumes, and its loss-curve plot."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from nnunet_ape.plots import save_figure


class CsvLog:
    """Append-only CSV of per-iteration values; ``truncate(it)`` drops rows after a resumed checkpoint."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path, self.columns = Path(path), columns

    def truncate(self, last_iteration: int) -> None:
        """Keep the header and rows with ``iteration <= last_iteration`` (rows a killed run wrote after its
        last checkpoint are dropped, so the resumed curve continues without a duplicate stretch)."""
        if not self.path.exists():
            return
        rows = self.read()
        self._rewrite([r for r in rows if int(r["iteration"]) <= last_iteration])

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)

    def append(self, row: dict) -> None:
        """Append one row (missing columns left empty)."""
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def read(self) -> list[dict]:
        """All rows as dicts of strings."""
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))


# what each logged column is, for the plot's legend
LOSS_NAMES = {
    "loss": "total loss", "dist": "distance loss (APE positions)", "equiv": "equivariance loss",
    "order": "order loss (BPR)", "distance": "distance loss (BPR)", "heuristic": "heuristic loss (BPR)",
}


def loss_curves(rows: list[dict], columns: list[str]) -> list[tuple[str, np.ndarray]]:
    """(legend label, values per row) of each loss column of a log's ``rows``; a column equal to one before it (the
    total of a loss with one term) joins that curve's label (``total loss = distance loss``) instead of its own."""
    curves: list[tuple[list[str], np.ndarray]] = []
    for column in [c for c in columns if c not in ("iteration", "lr", "seconds")]:
        values = np.array([float(r[column]) if r.get(column) else np.nan for r in rows])
        if np.all(np.isnan(values)):
            continue
        same = next((names for names, drawn in curves if np.allclose(drawn, values, rtol=1e-5, equal_nan=True)), None)
        if same is not None:
            same.append(column)
        else:
            curves.append(([column], values))
    return [(" = ".join(LOSS_NAMES.get(n, n) for n in names), values) for names, values in curves]


def plot_loss_curve(log: CsvLog, png: Path, title: str = "APE pretraining") -> Path | None:
    """Plot the log's :func:`loss_curves` (raw and a moving average) against iteration; None if the log is empty."""
    rows = log.read()
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iterations = np.array([int(r["iteration"]) for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values in loss_curves(rows, log.columns):
        (line,) = ax.plot(iterations, values, alpha=0.25, lw=0.8)
        window = max(1, len(values) // 50)
        smooth = np.convolve(np.nan_to_num(values), np.ones(window) / window, mode="valid")
        ax.plot(iterations[window - 1 :], smooth, color=line.get_color(), label=f"{label} (moving average of {window})")
    return _save_loss_axes(fig, ax, "iteration", title, png)


def plot_epoch_losses(curves: dict[str, list[float]], png: Path, title: str) -> Path | None:
    """One line per named series of per-epoch values (``{"training loss": [...], ...}``, log scale); None while
    there is no value yet. For trainers that log per epoch, as nnU-Net's do."""
    curves = {name: np.asarray(values, dtype=float) for name, values in curves.items() if len(values)}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in curves.items():
        ax.plot(np.arange(len(values)), values, marker="o" if len(values) < 30 else None, label=name)
    return _save_loss_axes(fig, ax, "epoch", title, png)


def _save_loss_axes(fig, ax, x_label: str, title: str, png: Path) -> Path:
    """The look every loss plot shares (log loss, legend, grid), then the PNG."""
    from matplotlib.ticker import FuncFormatter, LogFormatter

    ax.set_yscale("log")
    # plain-text tick labels: matplotlib's default log labels are mathtext, whose parser took 5-6 s per plot here,
    # at every checkpoint of a run
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ax.set_xlabel(x_label)
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, png)
