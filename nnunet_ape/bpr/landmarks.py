"""Landmark slices from label maps: where along z (feet to head) a structure starts, ends or is centred.

A landmark is a set of structures (label names, TotalSegmentator naming) and an edge: ``bottom`` (lowest slice of
their union), ``top`` (highest slice) or ``centre`` (middle of the two). The named ones follow bpreg's landmark
names (``pelvis_start`` ... ``eyes_end``, vertebrae ``L5`` ... ``C1``); any labeled structure also gives
``NAME_top``, ``NAME_bottom`` and ``NAME_centre``. A landmark counts only where the scan shows it: an edge on the
scan's first or last slice may be a cut, not anatomy, so it is left out.
"""

from __future__ import annotations

import numpy as np

from nnunet_ape.errors import InputError

EDGES = ("bottom", "top", "centre")

_GROUPS: dict[str, tuple[str, ...]] = {
    "hips": ("hip_left", "hip_right"),
    "femurs": ("femur_left", "femur_right"),
    "kidneys": ("kidney_left", "kidney_right"),
    "lungs": ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
              "lung_lower_lobe_right", "lung_left", "lung_right"),
    "eyes": ("eye_left", "eye_right"),
}

_VERTEBRAE = [f"L{i}" for i in range(5, 0, -1)] + [f"Th{i}" for i in range(12, 0, -1)] + [f"C{i}" for i in range(7, 0, -1)]

#: landmark name -> (structures, edge); bpreg's names where they exist
LANDMARKS: dict[str, tuple[tuple[str, ...], str]] = {
    "pelvis_start": (_GROUPS["hips"], "bottom"),
    "femur_end": (_GROUPS["femurs"], "top"),
    "pelvis_end": (_GROUPS["hips"], "top"),
    **{v: ((f"vertebrae_{v.replace('Th', 'T')}",), "centre") for v in _VERTEBRAE},
    "eyes_end": (_GROUPS["eyes"], "top"),
}

#: landmarks ``evaluate bpr`` uses by default: organ edges (Fei and McMillan's landmark organs) and vertebrae
DEFAULT_EVALUATION_LANDMARKS = ["liver_bottom", "liver_top", "kidneys_bottom", "kidneys_top", "lungs_bottom", "lungs_top",
                                "pelvis_end", "femur_end", *_VERTEBRAE]


def landmark_definition(name: str) -> tuple[tuple[str, ...], str]:
    """(structure names, edge) of a landmark: a named one (:data:`LANDMARKS`) or ``STRUCTURE_{top,bottom,centre}``
    where STRUCTURE is a label name or a group (hips, femurs, kidneys, lungs, eyes). InputError otherwise."""
    if name in LANDMARKS:
        return LANDMARKS[name]
    base, _, edge = name.rpartition("_")
    if base and edge in EDGES:
        return _GROUPS.get(base, (base,)), edge
    raise InputError(f"landmark '{name}': unknown; use one of {', '.join(LANDMARKS)} or STRUCTURE_top/_bottom/_centre")


def landmark_slice(label: np.ndarray, labels: dict[str, int], name: str) -> float | None:
    """Canonical z index (feet to head; a float for ``centre``) of landmark ``name`` in a canonical label map
    ``(X, Y, Z)``, or None when its structures are not labeled, absent, or reach the first/last slice."""
    structures, edge = landmark_definition(name)
    values = [labels[s] for s in structures if s in labels]
    if not values:
        return None
    present = np.isin(label, values).any(axis=(0, 1))
    slices = np.flatnonzero(present)
    if slices.size == 0:
        return None
    low, high, last = int(slices[0]), int(slices[-1]), label.shape[2] - 1
    cut_low, cut_high = low == 0, high == last
    if edge == "bottom":
        return None if cut_low else float(low)
    if edge == "top":
        return None if cut_high else float(high)
    return None if cut_low or cut_high else (low + high) / 2


def landmark_slices(label: np.ndarray, labels: dict[str, int], names: list[str]) -> dict[str, float]:
    """The landmarks of ``names`` that a canonical label map shows: name -> canonical z index."""
    found = {name: landmark_slice(label, labels, name) for name in names}
    return {name: z for name, z in found.items() if z is not None}
