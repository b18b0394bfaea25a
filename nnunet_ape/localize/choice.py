"""Each organ's localization method, chosen leave-one-shot-out on its own shots.

Candidates (as far as the localizer has the models): the body box (the organ's average place inside the body's
bounding box, no model), APE 6 edge points (the paper), APE all voxels (label transfer), BPR z (full x/y), and the
combinations APE x/y + BPR z and body box x/y + BPR z. For every candidate, each shot's box is predicted from the
other shots and measured on that shot twice: its recall when enlarged by the calibration of the other shots alone
(as a new case meets the localizer: its own organ did not take part in the calibration), and the fraction of the
image it covers at the calibration of all shots (the enlargement the localizer stores).

The rule, with fewer than :data:`MANY_SHOTS` shots: the localizer's own model method (:data:`PRINCIPAL`: APE all
voxels where it has label transfer, else APE 6 points, else BPR z) replaces the body box when, on the shots, it kept
at least as much of the organ as the body box (mean held-out recall) in crops no larger (mean crop fraction);
otherwise the body box. The other candidates' scores are measured and stored, and ``--method`` can force any of them,
but they do not compete: with few shots the held-out figures favour whichever candidate happened to fit those shots,
and more candidates mean more such luck. On the head-and-neck cohort with 5 shots (benchmarks/bench_headneck_choice.py,
2026-12-04), taking the smallest crop among all candidates that reached the target on the shots kept 0.93-0.94 of the
organs on new cases, against 0.97 for the body box and 0.96-0.97 for this rule. From :data:`MANY_SHOTS` shots on,
every candidate competes: the smallest mean crop among those that kept at least as much as the body box. With the
163 training cases as shots (benchmarks/bench_headneck_fov.py, 2026-12-05) APE all voxels, the principal method, was
no better than the 6 edge points on the organs where the body box lost. With one shot there is nothing to hold out,
and :func:`default_method` keeps what the localizer's models give.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from nnunet_ape.localize.boxes import box_inside_fraction, box_recall, calibrated_alpha, mask_box, shot_alphas, volume_ratio
from nnunet_ape.localize.margins import enlarge
from nnunet_ape.localize.masks import CroppedMask

CANDIDATES = ("body_box", "ape", "ape_all", "bpr_z", "ape_bpr", "body_bpr")
TITLES = {"body_box": "body box", "ape": "APE 6 points", "ape_all": "APE all voxels", "bpr_z": "BPR z",
          "ape_bpr": "APE x/y + BPR z", "body_bpr": "body box x/y + BPR z"}
PRINCIPAL = ("ape_all", "ape", "bpr_z")  # the localizer's own model method, the first of these it has
BOX_METHODS = ("body_box", "ape", "ape_all")  # enlarged by an alpha; the BPR ones take z from a score range
MANY_SHOTS = 20  # from this many shots on, every candidate competes (:func:`choose`); untested between 5 and 163


def relative_box(box: np.ndarray, body: np.ndarray) -> np.ndarray:
    """A box ``(2, 3)`` as fractions of the body box ``(2, 3)`` (0 at the body's low side, 1 at its high side)."""
    return (np.asarray(box, dtype=np.float64) - body[0]) / np.maximum(body[1] - body[0], 1)


def box_in_body(relative: np.ndarray, body: np.ndarray) -> np.ndarray:
    """The box ``(2, 3)`` (voxel indices) at the ``relative`` place (:func:`relative_box`) inside ``body``."""
    return body[0] + np.asarray(relative) * (body[1] - body[0])


def mean_relative_box(masks: list, bodies: list[np.ndarray]) -> np.ndarray:
    """The organ's average place ``(2, 3)`` in the body box over shots: ``masks`` (boolean or CroppedMask, canonical)
    and their CTs' body boxes."""
    return np.mean([relative_box(m.box() if isinstance(m, CroppedMask) else mask_box(m), b) for m, b in zip(masks, bodies)], axis=0)


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
    masks: list, boxes: dict[str, list[np.ndarray]], alphas: dict[str, list],
    z_ranges: list[tuple[int, int]] | None = None, ape_xy: str = "ape", spacings: list | None = None,
) -> dict[str, list[np.ndarray]]:
    """Per candidate, each shot's held-out crop box (canonical voxels). ``boxes``: per box method its held-out raw
    boxes, enlarged here by ``alphas[method][shot]`` (an alpha, or face margins in mm with the shot's ``spacings``,
    :func:`~nnunet_ape.localize.margins.enlarge`); ``z_ranges``: per shot the held-out BPR slice range (None
    without BPR), which gives ``bpr_z`` and replaces z for ``ape_bpr`` (x/y from ``ape_xy``: the localizer's APE box,
    label transfer where it has one) and ``body_bpr``."""
    from nnunet_ape.localize.zrange import z_box  # here, not at the top: zrange needs torch, the CLI's --help does not

    spacings = spacings if spacings is not None else [(1.0, 1.0, 1.0)] * len(masks)
    crops = {m: [enlarge(b, a, mask.shape, sp) for b, a, mask, sp in zip(held, alphas[m], masks, spacings)]
             for m, held in boxes.items()}
    if z_ranges is not None:
        crops["bpr_z"] = [z_box(mask.shape, *z) for mask, z in zip(masks, z_ranges)]
        for combined, xy in (("ape_bpr", ape_xy), ("body_bpr", "body_box")):
            if xy in crops:
                crops[combined] = [with_z(c, *z) for c, z in zip(crops[xy], z_ranges)]
    return crops


def _max_of_others(values: list[float]) -> list[float]:
    """For each position, the largest of the other values (a BPR margin's calibration without that shot)."""
    return [max(v for j, v in enumerate(values) if j != i) for i in range(len(values))]


def _calibration_of_others(values: list[float]) -> list[float]:
    """For each position, the calibrated alpha of the other values (the calibration without that shot)."""
    return [calibrated_alpha([v for j, v in enumerate(values) if j != i], 1.0)[0] for i in range(len(values))]


def selection_scores(masks: list, held: dict[str, list[np.ndarray]], target: float, ape_xy: str = "ape",
                     bpr: tuple[list[np.ndarray], list, Callable] | None = None,
                     needed: dict[str, list[float]] | None = None, scales: dict[str, np.ndarray] | None = None,
                     spacings: list | None = None) -> dict[str, dict]:
    """Each candidate's leave-one-shot-out scores on two or more shots (:func:`crop_scores`).

    ``held``: per box method (body_box, ape, ape_all) each shot's box predicted from the other shots; ``bpr``:
    (each shot's organ score interval, its ScoredCT, the interval combination) or None. Recall is measured as a new
    case would meet it: each shot's crop enlarged by the calibration of the *other* shots alone (the alpha of
    :func:`~nnunet_ape.localize.boxes.calibrated_alpha`, or the largest score margin they need); the crop fraction at the calibration of all shots, which the localizer stores.
    ``needed``: each box method's per-shot alphas (:func:`~nnunet_ape.localize.boxes.shot_alphas`) when the caller
    has them already. ``scales``: face margins instead of alphas (:mod:`nnunet_ape.localize.margins`): per box
    method the margins' shape, ``needed`` then holds each shot's ``t`` and ``spacings`` each shot's voxel size.
    """
    from nnunet_ape.localize.zrange import margin_for_recall, z_range

    needed = {m: needed[m] if needed and m in needed else shot_alphas(boxes, masks, target) for m, boxes in held.items()}
    full = {m: [calibrated_alpha(a, 1.0)[0]] * len(a) for m, a in needed.items()}
    nested = {m: _calibration_of_others(a) for m, a in needed.items()}
    if scales:  # each t times the method's margin shape
        full = {m: [scales[m] * t for t in ts] for m, ts in full.items()}
        nested = {m: [scales[m] * t for t in ts] for m, ts in nested.items()}
    z_full = z_nested = None
    if bpr is not None:
        intervals, scored, combine = bpr
        others = [combine([iv for j, iv in enumerate(intervals) if j != i]) for i in range(len(intervals))]
        margins = [margin_for_recall(mask, s.scores, iv, target) for mask, s, iv in zip(masks, scored, others)]
        z_full = [z_range(s.scores, iv, max(margins)) for s, iv in zip(scored, others)]
        z_nested = [z_range(s.scores, iv, m) for s, iv, m in zip(scored, others, _max_of_others(margins))]
    crops_full = held_out_crops(masks, held, full, z_full, ape_xy, spacings)
    crops_nested = held_out_crops(masks, held, nested, z_nested, ape_xy, spacings)
    return {m: crop_scores(masks, crops_nested[m], crops_full[m], target) for m in crops_full}


def crop_scores(masks: list, nested: list[np.ndarray], full: list[np.ndarray], target: float) -> dict:
    """Recall of each shot's ``nested`` crop (min and mean over shots), the mean fraction of the image the ``full``
    crops cover, and whether the mean recall reached ``target``."""
    recalls = [box_recall(mask, crop) for mask, crop in zip(masks, nested)]
    fractions = [1.0 / volume_ratio(mask.shape, crop) for mask, crop in zip(masks, full)]
    return {"recall_min": round(float(min(recalls)), 4), "recall_mean": round(float(np.mean(recalls)), 4),
            "crop_fraction": round(float(np.mean(fractions)), 5), "reached": bool(np.mean(recalls) >= target)}


def at_least_body_box(scores: dict[str, dict]) -> dict[str, dict]:
    """The candidates of :func:`crop_scores` results that match the body box's mean held-out recall with no larger
    mean crop, and the body box itself (all of them when there is no body box)."""
    body = scores.get("body_box")
    if body is None:
        return scores
    return {m: s for m, s in scores.items()
            if m == "body_box" or (s["recall_mean"] >= body["recall_mean"] and s["crop_fraction"] <= body["crop_fraction"])}


def principal_method(have) -> str | None:
    """The localizer's own model method: the first of :data:`PRINCIPAL` in ``have`` (method names), None if none."""
    return next((m for m in PRINCIPAL if m in have), None)


def choose(scores: dict[str, dict], shots: int = 0) -> str:
    """The chosen candidate of :func:`crop_scores` results by name (the module's rule) for an organ with ``shots``
    shots: below :data:`MANY_SHOTS` the principal method when it is at least as good as the body box on the shots
    (:func:`at_least_body_box`), else the body box; from :data:`MANY_SHOTS` on the smallest mean crop among every
    candidate at least as good as the body box (the body box on a tie)."""
    if shots >= MANY_SHOTS and "body_box" in scores:
        good = at_least_body_box(scores)
        return min(good, key=lambda m: (good[m]["crop_fraction"], m != "body_box"))
    principal = principal_method(scores)
    if principal is None:
        return "body_box"
    return principal if principal in at_least_body_box(scores) else "body_box"


def available_methods(has_ape: bool, has_bpr: bool, transfer: bool) -> list[str]:
    """The candidates a localizer with these models has, in :data:`CANDIDATES` order."""
    have = {"body_box"} | ({"ape"} if has_ape else set()) | ({"ape_all"} if transfer else set())
    if has_bpr:
        have |= {"bpr_z", "body_bpr"} | ({"ape_bpr"} if has_ape else set())
    return [m for m in CANDIDATES if m in have]


def default_method(has_ape: bool, has_bpr: bool, transfer: bool) -> str:
    """The method used without held-out evidence (one shot): the principal method of the localizer's models (APE's
    own box where there is APE: at one shot on the head-and-neck cohort, APE x/y + BPR z with BPR's default 20 mm
    margin kept 0.50 of the organs against 0.81 for APE all voxels)."""
    return principal_method(available_methods(has_ape, has_bpr, transfer)) or "body_box"


SAFETY_NET_QUANTILE = 0.05  # a new case whose agreement is below that of 95% of the shots gets the net
SAFETY_NET_SLACK = 0.9  # localizers fitted before 2026-12-05 (evening) stored the shots' lowest agreement: times this


def shot_agreement(held: dict[str, list[np.ndarray]], alphas: dict, masks: list, method: str,
                   spacings: list | None = None, quantile: float = SAFETY_NET_QUANTILE) -> float | None:
    """How far ``method``'s crops lay inside the body box's on the shots: the ``quantile`` (over shots; 0: the
    lowest) of the fraction of its held-out crop (box enlarged by ``alphas[method]``: an alpha, or face margins in mm
    with the shots' ``spacings``) inside the held-out body-box crop. None when ``method`` is the body box or has no
    held-out boxes (one shot, or a BPR method). A new case below this gets the safety net (:func:`safety_net`).
    Why a quantile, not the lowest: with 150 shots the lowest is one shot where the map failed (0 for the larynx on
    the head-and-neck cohort), and a net that only fires below that never fires."""
    if method == "body_box" or method not in held or not held[method] or "body_box" not in held:
        return None
    spacings = spacings if spacings is not None else [(1.0, 1.0, 1.0)] * len(masks)
    inside = [box_inside_fraction(enlarge(own, alphas[method], m.shape, sp), enlarge(body, alphas["body_box"], m.shape, sp))
              for own, body, m, sp in zip(held[method], held["body_box"], masks, spacings)]
    return float(np.quantile(inside, quantile))


def safety_net(crop: np.ndarray, body_crop: np.ndarray, agreement: float | None,
               slack: float = 1.0) -> tuple[np.ndarray, float | None, bool]:
    """The crop ``(2, 3)`` to use: ``crop`` itself, or its union with the body box's ``body_crop`` when the model's
    crop lies inside the body box's less than ``agreement`` (:func:`shot_agreement`) times ``slack``: the map and
    the body's outline then disagree about where the organ is (a cut field of view, an unusual patient, a map that
    failed), and one of them is wrong. Returns (crop, this case's inside fraction or None, whether the net was
    used)."""
    if agreement is None:
        return crop, None, False
    inside = box_inside_fraction(crop, body_crop)
    if inside >= agreement * slack:
        return crop, inside, False
    return np.stack([np.minimum(crop[0], body_crop[0]), np.maximum(crop[1], body_crop[1])]), inside, True
