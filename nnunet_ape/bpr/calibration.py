"""Landmark calibration of BPR scores, stored in the checkpoint, and what it gives: the look-up table of landmark
scores, the expected slope, the body part of each slice and the body part examined tag.

Raw scores have an arbitrary scale. Two anchor landmarks with target values (bpreg: ``pelvis_start`` = 0 and
``eyes_end`` = 100) fix a linear map ``calibrated = scale * raw + offset`` from their mean raw scores over labeled
cases; every landmark the cases show then gets its mean and std in calibrated units (the look-up table).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from nnunet_ape.bpr.landmarks import DEFAULT_EVALUATION_LANDMARKS, LANDMARKS, landmark_definition, landmark_slices
from nnunet_ape.bpr.scoring import check_scorable, clean_slice_scores, fitted_slope, score_at
from nnunet_ape.errors import InputError
from nnunet_ape.io import to_canonical
from nnunet_ape.cases import LabeledCase, read_case

DEFAULT_ANCHORS = {"pelvis_start": 0.0, "eyes_end": 100.0}

#: body part -> (lower, upper) landmark; None is open-ended. Disjoint ranges, as bpreg's "distinct body parts".
BODY_PARTS: dict[str, tuple[str | None, str | None]] = {
    "legs": (None, "pelvis_start"),
    "pelvis": ("pelvis_start", "pelvis_end"),
    "abdomen": ("pelvis_end", "Th9"),
    "chest": ("Th9", "Th2"),
    "shoulder-neck": ("Th2", "C3"),
    "head": ("C3", None),
}
_TAGS = {"pelvis": "PELVIS", "abdomen": "ABDOMEN", "chest": "CHEST", "shoulder-neck": "NECK", "head": "HEAD"}
SHORT_SCAN_MM = 100.0  # below this z-range the tag is the most frequent body part (bpreg's threshold)


@dataclass
class Calibration:
    """Linear map of raw scores to landmark units plus what was measured on the calibration cases."""

    anchors: dict[str, float]
    scale: float
    offset: float
    lookup: dict[str, dict[str, float]] = field(default_factory=dict)  # landmark -> mean, std, n (calibrated)
    expected_slope: float = float("nan")  # calibrated score units per mm, mean over the cases
    cases: list[str] = field(default_factory=list)

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Raw scores -> landmark units (any shape)."""
        return self.scale * np.asarray(raw, dtype=np.float64) + self.offset

    def to_dict(self) -> dict:
        """Plain dict for the checkpoint (torch.load with weights_only accepts it)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        return cls(**data)


def parse_anchors(specs: Sequence[str] | None) -> dict[str, float]:
    """``["NAME=VALUE", "NAME=VALUE"]`` -> anchors (two distinct landmarks, distinct values); defaults when None."""
    if not specs:
        return dict(DEFAULT_ANCHORS)
    anchors = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        try:
            anchors[name] = float(value) if sep else float("x")
        except ValueError:
            raise InputError(f"--anchor {spec}: write LANDMARK=VALUE, e.g. pelvis_start=0") from None
        landmark_definition(name)
    if len(anchors) != 2 or len(set(anchors.values())) != 2:
        raise InputError("--anchor: give exactly two landmarks with different values, e.g. --anchor pelvis_start=0 --anchor eyes_end=100")
    return anchors


@dataclass(eq=False)
class CaseScores:
    """One labeled case scored by one model: canonical raw and cleaned scores, body slices, z spacing (mm) and the
    true landmark slices (canonical index)."""

    name: str
    raw: np.ndarray
    cleaned: np.ndarray
    body: np.ndarray
    z_spacing: float
    landmarks: dict[str, float]


def score_case(model: torch.nn.Module, case: LabeledCase, landmarks: list[str], device: str = "cpu") -> CaseScores:
    """Score every slice of a labeled case and find the landmarks of ``landmarks`` its label map shows."""
    ct, label = read_case(case)
    canon, _ = to_canonical(ct)
    check_scorable(canon, str(case.image))
    label_canon = to_canonical(ct.with_array(label))[0].array
    raw, body, cleaned = clean_slice_scores(model, canon, device)
    return CaseScores(case.name, raw, cleaned, body, canon.spacing[2],
                      landmark_slices(np.asarray(label_canon), case.labels, landmarks))


def fit_calibration(model: torch.nn.Module, cases: list[LabeledCase], anchors: dict[str, float], device: str = "cpu") -> Calibration:
    """Calibrate a BPR model on labeled cases; InputError when an anchor landmark is in none of them."""
    names = list(dict.fromkeys([*anchors, *LANDMARKS, *DEFAULT_EVALUATION_LANDMARKS]))
    per_landmark: dict[str, list[float]] = {n: [] for n in names}
    slopes = []
    for case in tqdm(cases, desc="scoring calibration cases", unit="case"):
        scored = score_case(model, case, names, device)
        for name, z in scored.landmarks.items():
            per_landmark[name].append(score_at(scored.cleaned, z))
        slopes.append(fitted_slope(scored.cleaned, np.arange(len(scored.cleaned)) * scored.z_spacing))
    missing = [a for a in anchors if not per_landmark[a]]
    if missing:
        seen = ", ".join(n for n in names if per_landmark[n]) or "none"
        raise InputError(f"anchor landmark '{missing[0]}' is in none of the {len(cases)} case(s) (landmarks seen: {seen}); "
                         "choose two of those with --anchor NAME=VALUE")
    (low, low_value), (high, high_value) = sorted(anchors.items(), key=lambda kv: kv[1])
    raw_low, raw_high = np.mean(per_landmark[low]), np.mean(per_landmark[high])
    if not raw_high > raw_low:
        raise InputError(f"the model scores '{high}' ({raw_high:.3f}) not above '{low}' ({raw_low:.3f}); "
                         "it cannot be calibrated with these anchors (train it longer or choose anchors further apart)")
    scale = (high_value - low_value) / (raw_high - raw_low)
    offset = low_value - scale * raw_low
    lookup = {
        name: {"mean": float(scale * np.mean(v) + offset), "std": float(scale * np.std(v)), "n": len(v)}
        for name, v in per_landmark.items() if v
    }
    return Calibration(dict(anchors), float(scale), float(offset), lookup, float(scale * np.nanmean(slopes)), [c.name for c in cases])


def _part_bounds(lookup: dict[str, dict[str, float]]) -> dict[str, tuple[float, float] | None]:
    bounds = {}
    for part, (low, high) in BODY_PARTS.items():
        known = all(b is None or b in lookup for b in (low, high))
        bounds[part] = (lookup[low]["mean"] if low else -np.inf, lookup[high]["mean"] if high else np.inf) if known else None
    return bounds


def body_parts_examined(cleaned: np.ndarray, lookup: dict[str, dict[str, float]]) -> dict[str, list[int] | None]:
    """Body part -> indices (into ``cleaned``) of the slices whose calibrated score falls in its landmark range;
    None for a part whose bounding landmarks the calibration never saw."""
    out: dict[str, list[int] | None] = {}
    for part, bounds in _part_bounds(lookup).items():
        out[part] = None if bounds is None else np.flatnonzero((cleaned >= bounds[0]) & (cleaned < bounds[1])).tolist()
    return out


def body_part_tag(cleaned: np.ndarray, lookup: dict[str, dict[str, float]], z_range_mm: float) -> str:
    """bpreg-style tag such as ``CHEST-ABDOMEN``: the parts (feet excluded) whose landmark range the scan covers by
    at least half, joined head first; for scans shorter than 100 mm, or when no part qualifies, the part holding
    most slices. ``NONE`` when no part can be determined."""
    bounds = {p: b for p, b in _part_bounds(lookup).items() if p in _TAGS and b is not None}
    finite = cleaned[np.isfinite(cleaned)]
    if not bounds or finite.size == 0:
        return "NONE"
    low, high = finite.min(), finite.max()
    covered = []
    for part, (lo, hi) in bounds.items():
        extent = hi - lo
        if np.isfinite(extent) and extent > 0 and (min(high, hi) - max(low, lo)) / extent >= 0.5:
            covered.append(part)
    if z_range_mm < SHORT_SCAN_MM or not covered:
        counts = {p: int(((finite >= lo) & (finite < hi)).sum()) for p, (lo, hi) in bounds.items()}
        best = max(counts, key=counts.get)
        return _TAGS[best] if counts[best] > 0 else "NONE"
    order = list(_TAGS)[::-1]  # head first
    return "-".join(_TAGS[p] for p in sorted(covered, key=order.index))
