"""Slice scores of a whole CT with a trained BPR model: raw scores per slice and their cleaned version.

Everything here works in canonical order (LPS, slice 0 at the feet as the header says). Cleaning follows bpreg's
idea: slices without body (nothing above -500 HU) get no score (NaN), the rest are smoothed with a Gaussian of
``sigma_mm`` along z; a calibration (:mod:`nnunet_ape.bpr.calibration`) then maps them to landmark units.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d

from nnunet_ape.bpr.slices import axial_slices
from nnunet_ape.bpr.train_bpr import BPR_FORMAT
from nnunet_ape.canonical import CanonicalCT, canonical_ct
from nnunet_ape.checkpoint import load_checkpoint
from nnunet_ape.errors import InputError
from nnunet_ape.io import Volume
from nnunet_ape.models.bpr import BPRNet

MIN_SLICES = 2
BODY_HU = -500.0
SMOOTHING_MM = 10.0


def load_bpr_model(path: str | os.PathLike) -> tuple[BPRNet, dict]:
    """BPR checkpoint -> (BPRNet in eval mode on CPU, checkpoint dict, which may hold a ``calibration``)."""
    state = load_checkpoint(path, BPR_FORMAT)
    model = BPRNet(state["model_config"]["trunk"])
    model.load_state_dict(state["model"])
    return model.eval(), state


def check_scorable(canon: Volume, name: str) -> None:
    """InputError when a canonical CT has fewer than :data:`MIN_SLICES` axial slices."""
    if canon.shape[2] < MIN_SLICES:
        raise InputError(f"{name}: {canon.shape[2]} axial slice(s); slice scores need at least {MIN_SLICES} (a z-stack, not one slice)")


@torch.no_grad()
def raw_slice_scores(model: torch.nn.Module, canon: Volume | CanonicalCT, device: str | torch.device = "cpu",
                     batch_size: int = 64) -> np.ndarray:
    """Raw model score of every axial slice of a CT ``(X, Y, Z)`` (canonical, or a
    :class:`~nnunet_ape.canonical.CanonicalCT`) -> ``(Z,)`` float64, feet to head."""
    model = model.to(device).eval()
    ct = canonical_ct(canon)  # once, not per batch of slices
    scores = []
    for start in range(0, ct.canon.shape[2], batch_size):
        index = list(range(start, min(start + batch_size, ct.canon.shape[2])))
        scores.append(model(axial_slices(ct, index).to(device)).float().cpu())
    return torch.cat(scores).double().numpy()


def body_slices(canon: Volume, threshold_hu: float = BODY_HU, min_voxels: int = 20) -> np.ndarray:
    """``(Z,)`` bool: axial slices holding at least ``min_voxels`` voxels above ``threshold_hu`` (not empty air)."""
    return (np.asarray(canon.array) > threshold_hu).sum(axis=(0, 1)) >= min_voxels


def smooth_scores(raw: np.ndarray, valid: np.ndarray, z_spacing_mm: float, sigma_mm: float = SMOOTHING_MM) -> np.ndarray:
    """Gaussian-smoothed scores ``(Z,)`` over the ``valid`` slices (sigma in mm along z); NaN elsewhere."""
    cleaned = np.full(raw.shape, np.nan)
    if valid.any():
        cleaned[valid] = gaussian_filter1d(raw[valid], sigma=sigma_mm / z_spacing_mm, mode="nearest") if sigma_mm > 0 else raw[valid]
    return cleaned


def clean_slice_scores(model: torch.nn.Module, canon: Volume | CanonicalCT, device: str | torch.device = "cpu",
                       sigma_mm: float = SMOOTHING_MM) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score a CT (canonical, or a :class:`~nnunet_ape.canonical.CanonicalCT`): ``(raw, body, cleaned)``, each
    ``(Z,)`` feet to head; ``body`` marks slices with body, ``cleaned`` is ``raw`` smoothed over them
    (:func:`smooth_scores`) and NaN elsewhere."""
    ct = canonical_ct(canon)
    raw = raw_slice_scores(model, ct, device)
    body = body_slices(ct.canon)
    return raw, body, smooth_scores(raw, body, ct.canon.spacing[2], sigma_mm)


def score_at(scores: np.ndarray, z_index: float) -> float:
    """Score at a fractional canonical slice index, linearly interpolated (NaN where a neighbour is NaN)."""
    return float(np.interp(z_index, np.arange(len(scores)), scores))


def fitted_slope(scores: np.ndarray, z_mm: np.ndarray) -> float:
    """Least-squares slope (score units per mm) of the finite ``scores`` against ``z_mm``; NaN with < 2 of them."""
    finite = np.isfinite(scores)
    if finite.sum() < 2:
        return float("nan")
    return float(np.polyfit(z_mm[finite], scores[finite], 1)[0])
