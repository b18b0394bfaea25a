"""``nnunet-ape score``'s result for one CT: bpreg's JSON keys, in the file's slice order, with sanity checks.

Lists run over the image's axial slices as stored on disk (index k = slice k of the file along its axial axis);
``z`` is each slice's LPS z coordinate in mm. Checks, as warnings in the result (and on stderr from the CLI):
scores that fall from feet to head as the header orients the scan (slices stored reversed or a wrong direction),
and, with a calibration, a score slope per mm far from the calibration cases' (a wrong slice spacing: bpreg's
"valid z-spacing").
"""

from __future__ import annotations

import numpy as np
import torch

from nnunet_ape.bpr.calibration import Calibration, body_part_tag, body_parts_examined
from nnunet_ape.bpr.scoring import SMOOTHING_MM, check_scorable, clean_slice_scores, fitted_slope
from nnunet_ape.io import Volume, to_canonical

SLOPE_RATIO_TOLERANCE = 0.28  # bpreg's r_slope_threshold: |1 - observed/expected slope| above this -> invalid z-spacing


def _json_list(values: np.ndarray, digits: int = 4) -> list[float | None]:
    return [None if not np.isfinite(v) else round(float(v), digits) for v in values]


def _nan_to_none(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def score_volume(model: torch.nn.Module, ct: Volume, calibration: Calibration | None = None, device: str = "cpu",
                 name: str = "image", sigma_mm: float = SMOOTHING_MM) -> dict:
    """Score every axial slice of ``ct`` -> a JSON-ready dict (see the module docstring); InputError for < 2 slices."""
    canon, orientation = to_canonical(ct)
    check_scorable(canon, name)
    raw, body, cleaned = clean_slice_scores(model, canon, device, sigma_mm)
    unprocessed = np.where(body, raw, np.nan)
    if calibration is not None:
        cleaned, unprocessed = calibration.apply(cleaned), calibration.apply(unprocessed)
    z_mm = np.arange(canon.shape[2]) * canon.spacing[2]
    slope = fitted_slope(cleaned, z_mm)
    warnings = []
    if not body.any():
        warnings.append("no slice shows a body (nothing above -500 HU): no scores")
    elif slope < 0:
        warnings.append("scores fall from feet to head as the header orients this scan: its slices are probably "
                        "stored in reverse order or its direction is wrong; check the image before using the scores")
    flip = orientation.flip[2]
    to_file = (lambda a: a[::-1]) if flip else (lambda a: a)
    axis = orientation.perm[2]
    index = np.zeros((ct.shape[axis], 3))
    index[:, axis] = np.arange(ct.shape[axis])
    z_lps = ct.index_to_physical(index)[:, 2]
    result = {
        "cleaned slice scores": _json_list(to_file(cleaned)),
        "unprocessed slice scores": _json_list(to_file(unprocessed)),
        "z": _json_list(z_lps, 3),
        "slice axis": int(axis),
        "z-spacing": float(canon.spacing[2]),
        "reverse z-ordering": int((slope < 0) != flip) if np.isfinite(slope) else None,
        "observed slope": _nan_to_none(slope),
        "calibrated": calibration is not None,
    }
    result.update(_calibrated_keys(cleaned, calibration, slope, canon.spacing[2], flip, warnings))
    result["warnings"] = warnings
    result["settings"] = {"smoothing sigma": sigma_mm, "body threshold HU": -500.0,
                          "anchors": calibration.anchors if calibration else None}
    return result


def _calibrated_keys(cleaned: np.ndarray, calibration: Calibration | None, slope: float, z_spacing: float,
                     flip: bool, warnings: list[str]) -> dict:
    if calibration is None:
        return {"body part examined": None, "body part examined tag": "NONE", "look-up table": None,
                "expected slope": None, "slope ratio": None, "expected z-spacing": None, "valid z-spacing": None}
    n = len(cleaned)
    parts = body_parts_examined(cleaned, calibration.lookup)
    if flip:  # indices are canonical; report them as file slice indices
        parts = {p: None if v is None else sorted(n - 1 - i for i in v) for p, v in parts.items()}
    unknown = [p for p, v in parts.items() if v is None]
    if unknown:
        warnings.append(f"body parts {', '.join(unknown)}: their landmarks were not in the calibration cases")
    expected = calibration.expected_slope
    ratio = slope / expected if np.isfinite(expected) and expected != 0 else float("nan")
    valid = None if not np.isfinite(ratio) else int(abs(1 - ratio) <= SLOPE_RATIO_TOLERANCE)
    if valid == 0:
        warnings.append(f"score slope is {ratio:.2f}x the calibration cases': the slice spacing ({z_spacing:g} mm) is "
                        f"probably wrong (expected about {z_spacing * ratio:.2f} mm) or slices are missing")
    return {
        "body part examined": parts,
        "body part examined tag": body_part_tag(cleaned, calibration.lookup, n * z_spacing),
        "look-up table": calibration.lookup,
        "expected slope": _nan_to_none(expected),
        "slope ratio": _nan_to_none(ratio),
        "expected z-spacing": _nan_to_none(z_spacing * ratio),
        "valid z-spacing": valid,
    }
