"""Phantom cases and cohorts: ``make_phantom`` (one CT and its labels) and ``write_cohort`` (an nnU-Net raw dataset)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import SimpleITK as sitk
import numpy as np

from nnunet_ape.phantoms.template import MAX_VOXELS, ORGAN_LABELS
from nnunet_ape.phantoms.patient import _Patient, _draw_patient
from nnunet_ape.phantoms.scanner import _Acquisition, _draw_acquisition, _scan, _to_image
from nnunet_ape.phantoms.canvas import _Canvas
from nnunet_ape.phantoms.painters import _PAINTERS

def _draw_case(seed: int) -> tuple[_Patient, _Acquisition, np.random.Generator]:
    """The patient and acquisition of phantom ``seed``, and the scan generator (left where the acquisition draw
    ends, so the scanner noise that follows stays the same)."""
    anatomy_seed, scan_seed = np.random.SeedSequence(seed).spawn(2)
    pat = _draw_patient(anatomy_seed)
    rng = np.random.default_rng(scan_seed)
    return pat, _draw_acquisition(rng, pat), rng


def make_phantom(seed: int) -> tuple[sitk.Image, sitk.Image]:
    """Generate one synthetic CT scan and its organ labels.

    Args:
        seed: non-negative integer; the same seed always gives the same output.

    Returns:
        ``(ct, labels)`` on the same grid (size, spacing, origin, direction).
        ``ct``: int16 Hounsfield units (air -1000, fat ~-100, soft tissue 30-60,
        contrast-enhanced aorta ~180, bone 400-900). ``labels``: uint8 with the
        values of ``ORGAN_LABELS`` for organs inside the field of view, 0
        elsewhere. Spacing (x, y, z) is 1.5-3.0 mm in-plane and 2-5 mm between
        slices; direction is identity or diag(-1, -1, 1); at most
        ``MAX_VOXELS`` voxels. As numpy arrays (``GetArrayFromImage``) both
        are indexed [z, y, x].
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    pat, acq, rng = _draw_case(seed)
    canvas = _Canvas(acq, pat)
    for paint in _PAINTERS:
        paint(canvas, pat)
    ct = _scan(canvas.hu, acq, rng)
    return _to_image(ct, acq), _to_image(canvas.labels, acq)


def anatomical_z(cohort_seed: int, index: int) -> np.ndarray:
    """Ground truth for position models: the anatomical height (template mm: pelvis 0, lung apex ~650, the same
    anatomy at the same value in every patient) of each axial slice of case ``index`` of the cohort written by
    ``write_cohort(..., seed=cohort_seed)``, in canonical order (inferior to superior), shape ``(nz,)``."""
    pat, acq, _ = _draw_case(_case_seed(cohort_seed, index))
    return (acq.lo[2] + np.arange(acq.size[2]) * acq.spacing[2]) / pat.scale


# ---------------------------------------------------------------------------
# Cohort writer
# ---------------------------------------------------------------------------
def _case_seed(cohort_seed: int, index: int) -> int:
    """Seed of case ``index`` in a cohort; distinct cohorts do not share cases."""
    return int(np.random.SeedSequence([cohort_seed, index]).generate_state(1)[0])


def _dataset_json(n_cases: int, cohort_seed: int) -> dict:
    """nnU-Net v2 dataset.json content."""
    return {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **ORGAN_LABELS},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
        "name": "SyntheticCTPhantoms",
        "description": f"Synthetic CT phantoms from nnunet_ape.phantoms, cohort seed {cohort_seed}",
    }


def write_cohort(out_dir: str | Path, n_cases: int, seed: int = 0) -> list[Path]:
    """Write ``n_cases`` phantoms as an nnU-Net v2 raw dataset.

    Layout: ``out_dir/imagesTr/phantom_XXX_0000.nii.gz``,
    ``out_dir/labelsTr/phantom_XXX.nii.gz`` and ``out_dir/dataset.json``.
    Everything is written to a temporary sibling folder that is renamed to
    ``out_dir`` at the end, so a failure leaves no partial output.

    Args:
        out_dir: target folder; must not exist or be empty.
        n_cases: number of cases (>= 1).
        seed: cohort seed; case i uses a seed derived from (seed, i).

    Returns:
        Paths of the written images (inside ``out_dir``), in case order.

    Raises:
        FileExistsError: if ``out_dir`` exists and is not empty.
        ValueError: if ``n_cases`` < 1.
    """
    out_dir = Path(out_dir)
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"refusing to write into non-empty folder {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        names = _write_cases(tmp, n_cases, seed)
        (tmp / "dataset.json").write_text(json.dumps(_dataset_json(n_cases, seed), indent=2))
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out_dir / "imagesTr" / f"{name}_0000.nii.gz" for name in names]


def _write_cases(root: Path, n_cases: int, seed: int) -> list[str]:
    """Write images and labels into ``root``; returns the case identifiers."""
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    names = []
    for i in range(n_cases):
        name = f"phantom_{i:03d}"
        ct, labels = make_phantom(_case_seed(seed, i))
        sitk.WriteImage(ct, str(root / "imagesTr" / f"{name}_0000.nii.gz"), True)
        sitk.WriteImage(labels, str(root / "labelsTr" / f"{name}.nii.gz"), True)
        names.append(name)
    return names
