"""Figures a person looks at: CT planes with an RGB overlay of the 3 APE channels, with crop boxes, with organ
contours."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np

from nnunet_ape.atomic import atomic_path
from nnunet_ape.canonical import CanonicalCT, canonical_ct
from nnunet_ape.io import Volume, to_canonical


def _planes(array: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal slices of a canonical (LPS) array ``(X, Y, Z, ...)`` in radiological display
    order (rows top->bottom, columns left->right): axial (y, x), coronal (z reversed, x), sagittal (z reversed, y)."""
    x, y, z = centre
    axial = np.swapaxes(array[:, :, z], 0, 1)
    coronal = np.swapaxes(array[:, y, :], 0, 1)[::-1]
    sagittal = np.swapaxes(array[x, :, :], 0, 1)[::-1]
    return [axial, coronal, sagittal]


# patient directions at the (top, bottom, left, right) edges of each plane as _planes displays it (canonical LPS:
# x grows to the patient's left, y to posterior, z to superior; radiological convention: patient's right on the left)
EDGE_LETTERS = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}

RGB_KEY = ("colour = the map's 3 channels as red, green, blue, each stretched between its 1st and 99th percentile in "
           "this image; the channels are learned coordinates (not L/R, A/P, S/I one to one): smooth gradients across "
           "the body mean the map encodes position")


def orientation_letters(ax, plane: str) -> None:
    """Write the patient direction at the middle of each edge of ``ax`` showing ``plane`` (axial/coronal/sagittal)."""
    top, bottom, left, right = EDGE_LETTERS[plane]
    style = dict(transform=ax.transAxes, color="yellow", fontsize=11, fontweight="bold", ha="center", va="center")
    ax.text(0.5, 0.96, top, **style)
    ax.text(0.5, 0.04, bottom, **style)
    ax.text(0.03, 0.5, left, **style)
    ax.text(0.97, 0.5, right, **style)


def _aspects(spacing: tuple[float, float, float]) -> list[float]:
    sx, sy, sz = spacing
    return [sy / sx, sz / sx, sz / sy]


def rgb_from_embedding(embedding: np.ndarray) -> np.ndarray:
    """``(..., 3)`` embedding -> RGB in [0, 1], each channel scaled between its 1st and 99th percentile."""
    flat = embedding.reshape(-1, embedding.shape[-1]).astype(np.float32)
    lo, hi = np.percentile(flat, 1, axis=0), np.percentile(flat, 99, axis=0)
    return np.clip((embedding - lo) / np.maximum(hi - lo, 1e-6), 0, 1)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def embedding_overlay_png(
    ct: Volume, embedding: Volume, path: str | os.PathLike, title: str = "", window: tuple[float, float] = (-1000, 1000)
) -> Path:
    """PNG: top row the CT, bottom row the APE channels as RGB over it, in axial, coronal, sagittal planes
    through the image centre, with patient directions on every edge and a key to the colours under the panels (a
    short scan gets its coronal and sagittal panels as full-width rows);
    ``title`` (e.g. the file name) heads it. ``embedding`` must be on the CT's grid (array ``(X, Y, Z, 3)``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    canon_ct, _ = to_canonical(ct)
    canon_emb, _ = to_canonical(embedding)
    centre = tuple(s // 2 for s in canon_ct.shape)
    gray = np.clip((canon_ct.array.astype(np.float32) - window[0]) / (window[1] - window[0]), 0, 1)
    rgb = rgb_from_embedding(canon_emb.array)
    extent_mm = np.asarray(canon_ct.shape) * np.asarray(canon_ct.spacing)
    if is_short_scan(extent_mm):  # axial CT and map side by side on top, the other planes as full-width rows
        x_mm, y_mm, z_mm = extent_mm
        heights = [6 * y_mm / x_mm] + [z_mm / max(x_mm, y_mm) * 12] * 4  # inches at 12 inches width
        fig = plt.figure(figsize=(12, sum(heights) + 2.5))
        grid = fig.add_gridspec(5, 2, height_ratios=heights)
        axes = np.array([[fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, :]), fig.add_subplot(grid[3, :])],
                         [fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[2, :]), fig.add_subplot(grid[4, :])]])
    else:
        fig, axes = plt.subplots(2, 3, figsize=(12, 8))
    names = ["axial", "coronal", "sagittal"]
    for col, (g, c, aspect) in enumerate(zip(_planes(gray, centre), _planes(rgb, centre), _aspects(canon_ct.spacing))):
        axes[0, col].imshow(g, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        axes[1, col].imshow(g, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        axes[1, col].imshow(c, alpha=0.55, aspect=aspect, interpolation="nearest")
        axes[0, col].set_title(f"{names[col]} (CT)", fontsize=10)
        axes[1, col].set_title(f"{names[col]} (APE map over the CT)", fontsize=10)
        for row in range(2):
            orientation_letters(axes[row, col], names[col])
            axes[row, col].axis("off")
    fig.suptitle(title or "APE map")
    fig.text(0.5, 0.01, textwrap.fill(RGB_KEY, 150), ha="center", va="bottom", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return save_figure(fig, path)


def slice_through_boxes(boxes: list[np.ndarray], axis: int, size: int) -> int:
    """Index along ``axis`` that the most of ``boxes`` (``(2, 3)`` inclusive voxel boxes) reach; ties go to the one
    nearest the centre of their union; the image centre when there are no boxes."""
    if not boxes:
        return size // 2
    index = np.arange(size)
    covered = sum(((index >= b[0, axis] - 0.5) & (index <= b[1, axis] + 0.5)).astype(int) for b in boxes)
    lo, hi = min(b[0, axis] for b in boxes), max(b[1, axis] for b in boxes)
    centre = np.clip((lo + hi) / 2, 0, size - 1)
    best = np.flatnonzero(covered == covered.max())
    return int(best[np.argmin(np.abs(best - centre))])


# a scan whose z extent is under this fraction of its width is "short": its coronal and sagittal panels get
# the full figure width (rows) instead of a third of it, so they are not thin strips
SHORT_SCAN = 0.35


def is_short_scan(extent_mm: np.ndarray) -> bool:
    """Whether a canonical image of physical size ``extent_mm`` (x, y, z) is too short in z for side-by-side panels."""
    return bool(extent_mm[2] < SHORT_SCAN * max(extent_mm[0], extent_mm[1]))


def _box_figure(extent_mm: np.ndarray):
    """Figure and axes for the axial, coronal and sagittal panel of a canonical image of physical size
    ``extent_mm``: side by side, or for a short scan axial on top and the two others below it at the full figure
    width; returns (figure, axes, short)."""
    import matplotlib.pyplot as plt

    if not is_short_scan(extent_mm):
        fig, axes = plt.subplots(1, 3, figsize=(15, 5.5))
        return fig, list(axes), False
    x_mm, y_mm, z_mm = extent_mm
    heights = [y_mm / x_mm * 0.45 * 12] + [z_mm / max(x_mm, y_mm) * 12] * 2  # inches at 12 inches width
    fig = plt.figure(figsize=(12, sum(heights) + 2.2))
    grid = fig.add_gridspec(3, 1, height_ratios=heights)
    return fig, [fig.add_subplot(grid[i]) for i in range(3)], True


def boxes_png(ct: Volume | CanonicalCT, boxes: dict[str, dict], path: str | os.PathLike, title: str = "",
              window=(-200, 300)) -> Path:
    """PNG: CT in axial, coronal, sagittal planes through the boxes (each plane at the slice most crop boxes reach,
    named in its title) with every organ's predicted box (dashed, APE only) and crop box (solid), one colour per
    organ (faint where the slice does not reach the box), at physical aspect; a short scan gets its coronal and sagittal panels at full width. ``boxes`` as from
    ``predict_organ_boxes`` (voxel boxes in the CT's own index order). ``ct``: the CT (HU, any orientation), or the
    case's :class:`~nnunet_ape.canonical.CanonicalCT` when it has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    oriented = canonical_ct(ct)
    canon = oriented.canon
    shape = canon.shape

    def canonical(box) -> np.ndarray:
        return oriented.box_to_canonical(np.asarray(box))

    drawn = [canonical(e.get("crop_box_voxels", e.get("box_voxels"))) for e in boxes.values()
             if "crop_box_voxels" in e or "box_voxels" in e]
    centre = tuple(slice_through_boxes(drawn, axis, shape[axis]) for axis in range(3))
    gray = np.clip((canon.array.astype(np.float32) - window[0]) / (window[1] - window[0]), 0, 1)
    fig, axes, short = _box_figure(np.asarray(shape) * np.asarray(canon.spacing))
    colours = plt.cm.tab20(np.linspace(0, 1, max(len(boxes), 1)))
    # (column axis, row axis, rows reversed?, axis the plane cuts) of each displayed plane, as in _planes
    layout = [(0, 1, False, 2), (0, 2, True, 1), (1, 2, True, 0)]
    for ax, plane, aspect, (col, row, flip_rows, cut), name in zip(
        axes, _planes(gray, centre), _aspects(canon.spacing), layout, ["axial", "coronal", "sagittal"]
    ):
        ax.imshow(plane, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        for colour, (organ, entry) in zip(colours, boxes.items()):
            for key, style in (("box_voxels", "--"), ("crop_box_voxels", "-")):
                if key not in entry:
                    continue
                b = canonical(entry[key])
                cuts = b[0, cut] - 0.5 <= centre[cut] <= b[1, cut] + 0.5  # faint: a box this slice does not reach
                r0, r1 = b[0, row], b[1, row]
                if flip_rows:
                    r0, r1 = shape[row] - 1 - r1, shape[row] - 1 - r0
                ax.add_patch(Rectangle((b[0, col] - 0.5, r0 - 0.5), b[1, col] - b[0, col] + 1, r1 - r0 + 1,
                                       fill=False, ec=colour, ls=style, lw=1.2, alpha=1.0 if cuts else 0.35,
                                       label=organ if style == "-" and name == "axial" else None))
        where = canon.index_to_physical(np.asarray(centre, dtype=np.float64))[cut]
        ax.set_title(f"{name} at {'xyz'[cut]} = {where:.1f} mm (LPS; slice {centre[cut] + 1} of {shape[cut]} from "
                     f"{('right', 'anterior', 'inferior')[cut]})", fontsize=10)
        orientation_letters(ax, name)
        ax.axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8)
    fig.suptitle((title + ": " if title else "") + "dashed = retrieved (APE), solid = crop box")
    fig.tight_layout(rect=(0, 0.06 if not short else 0.8 / fig.get_figheight(), 1, 1))
    return save_figure(fig, path)


def scores_png(ct: Volume, result: dict, path: str | os.PathLike, title: str = "", window=(-1000, 1000)) -> Path:
    """PNG: the CT's coronal plane (feet at the bottom) beside its slice scores plotted against z on the same
    vertical axis (mm), raw as dots and cleaned as a line; calibrated landmark scores as dashed lines.
    ``result`` as from :func:`nnunet_ape.bpr.report.score_volume`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    canon, orientation = to_canonical(ct)
    gray = np.clip((canon.array.astype(np.float32) - window[0]) / (window[1] - window[0]), 0, 1)
    coronal = np.swapaxes(gray[:, canon.shape[1] // 2, :], 0, 1)[::-1]
    z = np.asarray(result["z"], dtype=float)
    raw = np.asarray(result["unprocessed slice scores"], dtype=float)
    cleaned = np.asarray(result["cleaned slice scores"], dtype=float)
    width_mm = canon.shape[0] * canon.spacing[0]
    half = canon.spacing[2] / 2
    z_lo, z_hi = z.min() - half, z.max() + half
    # the CT panel gets the width that keeps its mm square on a 5-inch-tall axis
    ct_inches = float(np.clip(5.0 * width_mm / max(z_hi - z_lo, 1e-6), 1.5, 9.0))
    fig, (ax_ct, ax_s) = plt.subplots(1, 2, figsize=(ct_inches + 7, 6.2), sharey=True, gridspec_kw={"width_ratios": [ct_inches, 5.5]})
    ax_ct.imshow(coronal, cmap="gray", vmin=0, vmax=1, extent=(0, width_mm, z_lo, z_hi), aspect="auto", interpolation="nearest")
    ax_s.set_ylim(z_lo, z_hi)
    ax_ct.set_xlabel("x (mm, patient right to left)")
    ax_ct.set_ylabel("z (mm, LPS)")
    ax_ct.set_title("coronal")
    ax_s.plot(raw, z, ".", ms=3, color="0.6", label="unprocessed")
    ax_s.plot(cleaned, z, "-", lw=2, color="tab:blue", label="cleaned")
    for name, entry in (result.get("look-up table") or {}).items():
        if np.isfinite(cleaned).any() and np.nanmin(cleaned) <= entry["mean"] <= np.nanmax(cleaned):
            ax_s.axvline(entry["mean"], ls="--", lw=0.8, color="tab:red")
            ax_s.text(entry["mean"], z.max(), name, rotation=90, va="top", ha="right", fontsize=7, color="tab:red")
    ax_s.set_xlabel("slice score" + (" (landmark units)" if result.get("calibrated") else " (raw)"))
    ax_s.set_title(f"body part examined: {result.get('body part examined tag', 'NONE')}")
    ax_s.legend(loc="lower right", fontsize=8)
    ax_s.grid(alpha=0.3)
    fig.suptitle(title or "BPR slice scores")
    fig.tight_layout()
    return save_figure(fig, path)


def contours_png(ct: Volume, truth: np.ndarray, predictions: dict[str, np.ndarray], organs: dict[str, int],
                 path: str | os.PathLike, boxes: dict[str, np.ndarray | None] | None = None, title: str = "",
                 window=(-200, 300)) -> Path:
    """PNG: one coronal CT slice per prediction (through the centre of the true organs), the true organ contours
    (white, dashed) and the predicted ones (one colour per organ), the crop box where ``boxes`` gives one (yellow),
    and each panel's Dice per organ in its title.

    ``truth`` and each of ``predictions`` (title -> label map): integer arrays ``(X, Y, Z)`` on ``ct``'s grid (the
    CT's own index order); ``organs``: organ name -> label value; ``boxes``: title -> box ``(2, 3)`` in the CT's
    voxel indices, low corner included and high corner excluded (``nnunet-ape predict``'s ``box_voxels``), or None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from nnunet_ape.segmentation_scores import dice

    oriented = canonical_ct(ct)
    canon = oriented.canon
    true_canon = oriented.array_to_canonical(truth)
    present = np.isin(true_canon, list(organs.values()))
    y = int(np.round(np.argwhere(present)[:, 1].mean())) if present.any() else canon.shape[1] // 2
    gray = np.clip((canon.array.astype(np.float32) - window[0]) / (window[1] - window[0]), 0, 1)
    coronal = lambda a: _planes(a, (0, y, 0))[1]  # noqa: E731
    aspect = _aspects(canon.spacing)[1]
    colours = dict(zip(organs, plt.cm.tab10(np.arange(len(organs)) % 10)))
    height = 6 * canon.shape[2] * canon.spacing[2] / (canon.shape[0] * canon.spacing[0])  # panel height at 6 in width
    fig, axes = plt.subplots(1, len(predictions), figsize=(6 * len(predictions), height + 1.6), squeeze=False)
    for ax, (name, labels) in zip(axes[0], predictions.items()):
        pred_canon = oriented.array_to_canonical(labels)
        ax.imshow(coronal(gray), cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        scores = []
        for organ, value in organs.items():
            t, p = true_canon == value, pred_canon == value
            if t.any():
                scores.append(f"{organ} {dice(p, t):.2f}")
            if coronal(t).any():
                ax.contour(coronal(t).astype(float), levels=[0.5], colors="white", linestyles="--", linewidths=1.0)
            if coronal(p).any():
                ax.contour(coronal(p).astype(float), levels=[0.5], colors=[colours[organ]], linewidths=1.4)
        box = (boxes or {}).get(name)
        if box is not None:
            b = oriented.box_to_canonical(np.asarray(box, dtype=np.float64) - np.array([[0, 0, 0], [1, 1, 1]]))
            z_rows = canon.shape[2] - 1 - b[1, 2], canon.shape[2] - 1 - b[0, 2]
            ax.add_patch(Rectangle((b[0, 0] - 0.5, z_rows[0] - 0.5), b[1, 0] - b[0, 0] + 1, z_rows[1] - z_rows[0] + 1,
                                   fill=False, ec="yellow", lw=1.2))
        ax.set_title(f"{name}\nDice: {', '.join(scores)}", fontsize=10)
        orientation_letters(ax, "coronal")
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colours[o], lw=2, label=f"{o} (predicted)") for o in organs]
    handles += [plt.Line2D([], [], color="white", ls="--", label="true contour"),
                plt.Line2D([], [], color="yellow", label="crop box")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, facecolor="0.85")
    fig.suptitle((title + ": " if title else "") + f"coronal slice {y + 1} of {canon.shape[1]} (from anterior)")
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1 - 0.3 / fig.get_figheight()))
    return save_figure(fig, path)
