"""Face margins in mm: how a method's raw box becomes its crop.

A raw box (retrieved by APE, or placed in the body box) misses its organ by some millimetres on each of its six
faces. The crop grows each face by a margin ``t x scale[face]`` mm: ``scale`` is the shape of the shots' misses (per
face, the :data:`SCALE_QUANTILE` quantile of how far the organ reached beyond that face of its held-out box, at
least :data:`MIN_SCALE_MM`), and ``t`` is calibrated like the enlargement alpha was: each shot's held-out box needs
the smallest ``t`` at which it keeps the target recall, and the stored ``t`` is the split-conformal quantile of
those (:func:`~nnunet_ape.localize.boxes.calibrated_alpha`), so that a new case needs no more with the stated
coverage.

Why not the paper's alpha (each side scaled about the box's centre): with many shots the calibrated enlargement is
the largest the shots needed, and one shot missed by a few centimetres along one axis then scales all three axes of
every crop by that factor. Margins grow only the faces that the shots missed on, by millimetres, not by the box's
size. On the head-and-neck cohort (docs/localization.md, docs/benchmarks.md) margins kept as many organs as alpha in
crops several times smaller.

Boxes are ``(2, 3)`` float arrays of inclusive voxel indices (low corner, high corner); margins ``(2, 3)`` mm
(low faces, high faces), both in the axes of the CT they are applied to (canonical in the localizer).
"""

from __future__ import annotations

import numpy as np

from nnunet_ape.localize.boxes import box_slices, calibrated_alpha, clip_box, smallest_reaching

SCALE_QUANTILE = 0.9  # of the shots' misses per face: the margins' shape
MIN_SCALE_MM = 2.0  # a face the shots never missed on still grows with t


def grow_box(box: np.ndarray, margin_mm: np.ndarray, spacing, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """``box`` ``(2, 3)`` with each face moved outwards by ``margin_mm`` ``(2, 3)`` (a negative margin moves it
    inwards, never past the box's centre), converted to voxels with ``spacing`` (mm per axis); clipped to
    ``shape`` when given."""
    box = np.asarray(box, dtype=np.float64)
    step = np.asarray(spacing, dtype=np.float64)[:3]
    margin = np.asarray(margin_mm, dtype=np.float64) / step
    centre = box.mean(0)
    out = np.stack([np.minimum(box[0] - margin[0], centre), np.maximum(box[1] + margin[1], centre)])
    return clip_box(out, shape) if shape is not None else out


def face_misses_mm(box: np.ndarray, truth: np.ndarray, spacing) -> np.ndarray:
    """How far the true box ``truth`` ``(2, 3)`` reaches beyond each face of ``box``, in mm ``(2, 3)`` (low faces,
    high faces; negative where the box reaches beyond the organ)."""
    step = np.asarray(spacing, dtype=np.float64)[:3]
    return np.stack([(box[0] - truth[0]) * step, (truth[1] - box[1]) * step])


def face_scale(boxes: list[np.ndarray], truths: list[np.ndarray], spacings: list) -> np.ndarray:
    """The margins' shape ``(2, 3)`` mm from held-out boxes and their shots' true boxes: per face the
    :data:`SCALE_QUANTILE` quantile of the positive misses (:func:`face_misses_mm`), at least :data:`MIN_SCALE_MM`.
    Every face :data:`MIN_SCALE_MM` without boxes."""
    if not boxes:
        return np.full((2, 3), MIN_SCALE_MM)
    misses = np.stack([np.maximum(face_misses_mm(b, t, s), 0) for b, t, s in zip(boxes, truths, spacings)])
    return np.maximum(np.quantile(misses, SCALE_QUANTILE, axis=0), MIN_SCALE_MM)


def t_for_recall(mask, box: np.ndarray, scale: np.ndarray, spacing, target: float = 0.99) -> float:
    """Smallest ``t`` (to 0.01) at which ``grow_box(box, t * scale)`` keeps ``target`` of ``mask`` (boolean or
    :class:`~nnunet_ape.localize.masks.CroppedMask`); negative when the box can shrink. Up to the ``t`` that covers
    the whole image, returned when even that misses the target."""
    total = int(mask.sum())
    if total == 0:
        raise ValueError("mask is empty")
    shape = mask.shape

    def recall(t: float) -> float:
        return float(mask[box_slices(grow_box(box, t * scale, spacing, shape), shape)].sum()) / total

    extent_mm = np.asarray(shape[:3], dtype=np.float64) * np.asarray(spacing, dtype=np.float64)[:3]
    high = float(np.max(extent_mm / scale.min(axis=0))) + 1.0  # every face past the image's far side
    half_mm = (np.asarray(box[1]) - np.asarray(box[0])) / 2 * np.asarray(spacing, dtype=np.float64)[:3]
    low = -float(np.max(half_mm / scale.max(axis=0))) - 0.01  # every face at the centre
    return smallest_reaching(recall, low, high, target)


def shot_ts(boxes: list[np.ndarray], masks: list, scale: np.ndarray, spacings: list, target: float) -> list[float]:
    """Per shot, the ``t`` its held-out box needs (:func:`t_for_recall`)."""
    return [t_for_recall(m, b, scale, s, target) for b, m, s in zip(boxes, masks, spacings)]


def calibrated_margins(ts: list[float], scale: np.ndarray) -> tuple[np.ndarray | None, float | None]:
    """The margins to store ``(2, 3)`` mm: the split-conformal quantile of the shots' ``ts`` times ``scale``, and the
    share of new cases it is expected to cover; ``(None, None)`` without shots to calibrate on."""
    if not ts:
        return None, None
    t, coverage = calibrated_alpha(ts, 0.0)
    return np.asarray(scale) * t, coverage


ENLARGEMENTS = ("margins", "alpha")  # localize fit --enlargement: face margins in mm, or the paper's alpha


def enlarge(box: np.ndarray, enlargement, shape: tuple[int, ...], spacing) -> np.ndarray:
    """A crop box from a raw ``box`` ``(2, 3)``: ``enlargement`` a float alpha (each side scaled about the centre,
    :func:`~nnunet_ape.localize.boxes.enlarge_box`) or ``(2, 3)`` face margins in mm (:func:`grow_box`, with
    ``spacing`` mm per axis); clipped to ``shape``."""
    from nnunet_ape.localize.boxes import enlarge_box

    if np.ndim(enlargement) == 0:
        return enlarge_box(box, float(enlargement), shape)
    return grow_box(box, np.asarray(enlargement, dtype=np.float64), spacing, shape)


def stored_enlargement(entry: dict, method: str):
    """The enlargement a localizer entry stores for ``method`` (body_box, ape, ape_all): its face margins in mm
    ``(2, 3)`` where it has them (fitted since 2026-12-05 with margins), else its alpha."""
    margins = entry.get("margins", {}).get(method)
    if margins is not None:
        return np.asarray(margins["mm"], dtype=np.float64)
    if method == "body_box":
        return float(entry["body_box"]["alpha"])
    if method == "ape":
        return float(entry.get("edge_points_alpha", entry["alpha"]))
    return float(entry["alpha"])
