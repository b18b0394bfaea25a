"""Segmentation scores of a predicted label map against the reference, per organ: Dice and normalized surface Dice
(NSD at a tolerance in mm), in the reference's own geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a 6-neighbour outside it (the image border counts as outside)."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(3, 1), border_value=0)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    total = int(pred.sum()) + int(ref.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & ref).sum()) / total


def surface_dice(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], tolerance_mm: float) -> float:
    """Normalized surface Dice: the fraction of both masks' surface voxels within ``tolerance_mm`` of the other's
    surface (Euclidean, ``spacing`` in the arrays' axis order). 0 when exactly one mask is empty, 1 when both are."""
    from scipy import ndimage

    if not pred.any() or not ref.any():
        return float(pred.any() == ref.any())
    both = pred | ref
    pad = [int(np.ceil(tolerance_mm / s)) + 1 for s in spacing]
    lo = [max(0, int(np.min(ix)) - p) for ix, p in zip(np.nonzero(both), pad)]
    hi = [min(n, int(np.max(ix)) + p + 1) for ix, p, n in zip(np.nonzero(both), pad, both.shape)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sp, sr = _surface(pred[box]), _surface(ref[box])
    to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    close = int((to_ref[sp] <= tolerance_mm).sum()) + int((to_pred[sr] <= tolerance_mm).sum())
    return close / int(sp.sum() + sr.sum())


def _same_grid(a, b) -> bool:
    """Whether two SimpleITK images share size, spacing, origin and direction (to 1e-4)."""
    return a.GetSize() == b.GetSize() and all(np.allclose(x, y, atol=1e-4) for x, y in (
        (a.GetSpacing(), b.GetSpacing()), (a.GetOrigin(), b.GetOrigin()), (a.GetDirection(), b.GetDirection())))


def score_case(pred_file: Path, label_file: Path, organs: dict[str, int], nsd_mm: tuple[float, ...] = ()) -> dict:
    """Per organ contoured in ``label_file``: ``{"dice": d, "nsd_2mm": s, ...}`` of the prediction ``pred_file``,
    which must lie on the label's grid (else ValueError). Organs the labels do not contour are left out."""
    import SimpleITK as sitk

    pred_image, ref_image = sitk.ReadImage(str(pred_file)), sitk.ReadImage(str(label_file))
    if not _same_grid(pred_image, ref_image):
        raise ValueError(f"{pred_file} does not lie on the grid of {label_file}")
    pred, ref = sitk.GetArrayViewFromImage(pred_image), sitk.GetArrayViewFromImage(ref_image)
    spacing = tuple(reversed(ref_image.GetSpacing()))  # numpy axis order z, y, x
    out = {}
    for name, value in organs.items():
        r = ref == value
        if not r.any():
            continue
        p = pred == value
        out[name] = {"dice": dice(p, r), **{f"nsd_{t:g}mm": surface_dice(p, r, spacing, t) for t in nsd_mm}}
    return out


def mean_per_organ(scores: dict[str, dict], organs: list[str], metric: str) -> dict[str, tuple[float, int]]:
    """Mean of ``metric`` (e.g. "dice") per organ over the cases of ``scores`` (case -> :func:`score_case` output)
    that contour it: ``{organ: (mean, number of those cases)}``, the mean NaN where no case contours the organ."""
    out = {}
    for organ in organs:
        values = [s[organ][metric] for s in scores.values() if organ in s]
        out[organ] = (float(np.mean(values)) if values else float("nan"), len(values))
    return out
