"""Each organ's localization method, chosen leave-one-shot-out on its own shots.

Candidates (as far as the localizer has the models): the body box (the organ's average place inside the body's
bounding box, no model), APE 6 edge points (the paper), APE all voxels (label transfer), BPR z (full x/y), and the
combinations APE x/y + BPR z and body box x/y + BPR z. For every candidate, each shot's box is predicted from the
other shots and enlarged by the candidate's leave-one-shot-out calibration (box alpha, BPR score margin); the
held-out crop is then measured on that shot: recall of its organ and the fraction of its image it covers.

The rule: among the candidates whose held-out crops keep the target recall on every shot, the one with the smallest
mean crop fraction; when none does, the one with the highest mean recall. Ties go to the earlier candidate in
:data:`CANDIDATES` (the body box first: a model must do better than the trivial baseline to be chosen). With one
shot there is nothing to hold out, and :func:`default_method` keeps what the localizer's models give.
"""

from __future__ import annotations

import numpy as np

from nnunet_ape.localize.boxes import alpha_over_shots, box_recall, enlarge_box, mask_box, volume_ratio

CANDIDATES = ("body_box", "ape", "ape_all", "bpr_z", "ape_bpr", "body_bpr")
TITLES = {"body_box": "body box", "ape": "APE 6 points", "ape_all": "APE all voxels", "bpr_z": "BPR z",
          "ape_bpr": "APE x/y + BPR z", "body_bpr": "body box x/y + BPR z"}
BOX_METHODS = ("body_box", "ape", "ape_all")  # enlarged by an alpha; the BPR ones take z from a score range


def relative_box(box: np.ndarray, body: np.ndarray) -> np.ndarray:
    """A box ``(2, 3)`` as fractions of the body box ``(2, 3)`` (0 at the body's low side, 1 at its high side)."""
    return (np.asarray(box, dtype=np.float64) - body[0]) / np.maximum(body[1] - body[0], 1)


def box_in_body(relative: np.ndarray, body: np.ndarray) -> np.ndarray:
    """The box ``(2, 3)`` (voxel indices) at the ``relative`` place (:func:`relative_box`) inside ``body``."""
    return body[0] + np.asarray(relative) * (body[1] - body[0])


def mean_relative_box(masks: list, bodies: list[np.ndarray]) -> np.ndarray:
    """The organ's average place ``(2, 3)`` in the body box over shots: ``masks`` (boolean or CroppedMask, canonical)
    and their CTs' body boxes."""
    return np.mean([relative_box(_mask_box(m), b) for m, b in zip(masks, bodies)], axis=0)


def _mask_box(mask) -> np.ndarray:
    if hasattr(mask, "offset"):  # a CroppedMask: its box is its crop
        return np.stack([mask.offset, mask.offset + np.asarray(mask.crop.shape) - 1]).astype(np.float64)
    return mask_box(mask)


def held_out_body_boxes(masks: list, bodies: list[np.ndarray]) -> list[np.ndarray]:
    """Per shot, its body-box prediction from the other shots' relative boxes (empty for one shot)."""
    if len(masks) < 2:
        return []
    return [box_in_body(mean_relative_box([m for j, m in enumerate(masks) if j != i],
                                          [b for j, b in enumerate(bodies) if j != i]), bodies[i])
            for i in range(len(masks))]


def with_z(box: np.ndarray, low: float, high: float) -> np.ndarray:
    """``box`` ``(2, 3)`` with its z extent replaced by slices ``low..high``."""
    out = np.array(box, dtype=np.float64)
    out[:, 2] = (low, high)
    return out


def held_out_crops(
    masks: list, boxes: dict[str, list[np.ndarray]], alphas: dict[str, float],
    z_ranges: list[tuple[int, int]] | None = None, ape_xy: str = "ape",
) -> dict[str, list[np.ndarray]]:
    """Per candidate, each shot's held-out crop box (canonical voxels). ``boxes``: per box method its held-out raw
    boxes, enlarged here by ``alphas[method]``; ``z_ranges``: per shot the held-out BPR slice range with the
    calibrated margin (None without BPR), which gives ``bpr_z`` and replaces z for ``ape_bpr`` (x/y from
    ``ape_xy``: the localizer's APE box, label transfer where it has one) and ``body_bpr``."""
    from nnunet_ape.localize.zrange import z_box  # here, not at the top: zrange needs torch, the CLI's --help does not

    crops = {m: [enlarge_box(b, alphas[m], mask.shape) for b, mask in zip(held, masks)] for m, held in boxes.items()}
    if z_ranges is not None:
        crops["bpr_z"] = [z_box(mask.shape, *z) for mask, z in zip(masks, z_ranges)]
        for combined, xy in (("ape_bpr", ape_xy), ("body_bpr", "body_box")):
            if xy in crops:
                crops[combined] = [with_z(c, *z) for c, z in zip(crops[xy], z_ranges)]
    return crops


def held_out_z_ranges(intervals: list[np.ndarray], scored: list, margin: float, combine) -> list[tuple[int, int]]:
    """Per shot, the slices whose score lies in the other shots' combined interval widened by ``margin``.
    ``combine``: the interval combination (:func:`nnunet_ape.localize.zrange.combine_intervals` with its ``how``).
    Empty for one shot."""
    from nnunet_ape.localize.zrange import z_range

    if len(intervals) < 2:
        return []
    return [z_range(s.scores, combine([iv for j, iv in enumerate(intervals) if j != i]), margin)
            for i, s in enumerate(scored)]


def crop_scores(masks: list, crops: list[np.ndarray], target: float) -> dict:
    """Held-out recall (min and mean over shots), mean fraction of the image the crops cover, and whether every
    shot kept ``target`` of its organ."""
    recalls = [box_recall(mask, crop) for mask, crop in zip(masks, crops)]
    fractions = [1.0 / volume_ratio(mask.shape, crop) for mask, crop in zip(masks, crops)]
    return {"recall_min": round(float(min(recalls)), 4), "recall_mean": round(float(np.mean(recalls)), 4),
            "crop_fraction": round(float(np.mean(fractions)), 5), "reached": bool(min(recalls) >= target)}


def choose(scores: dict[str, dict]) -> str:
    """The chosen candidate of :func:`crop_scores` results by name (the module's rule)."""
    order = [m for m in CANDIDATES if m in scores]
    reached = [m for m in order if scores[m]["reached"]]
    if reached:
        return min(reached, key=lambda m: (scores[m]["crop_fraction"], order.index(m)))
    return max(order, key=lambda m: (scores[m]["recall_mean"], -order.index(m)))


def available_methods(has_ape: bool, has_bpr: bool, transfer: bool) -> list[str]:
    """The candidates a localizer with these models has, in :data:`CANDIDATES` order."""
    have = {"body_box"} | ({"ape"} if has_ape else set()) | ({"ape_all"} if transfer else set())
    if has_bpr:
        have |= {"bpr_z", "body_bpr"} | ({"ape_bpr"} if has_ape else set())
    return [m for m in CANDIDATES if m in have]


def default_method(has_ape: bool, has_bpr: bool, transfer: bool) -> str:
    """The method used without held-out evidence (one shot): the localizer's models as they always combined."""
    if has_ape:
        xy = "ape_all" if transfer else "ape"
        return "ape_bpr" if has_bpr else xy
    return "bpr_z" if has_bpr else "body_box"
