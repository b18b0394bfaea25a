"""``nnunet-ape demo``: the whole APE pipeline on built-in synthetic phantoms, no user data and no downloads."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_ape.checkpoint import load_ape_model
from nnunet_ape.distributed import resolve_device
from nnunet_ape.embed import embed_volume, stored_settings
from nnunet_ape.errors import InputError
from nnunet_ape.inputs import nnunet_images
from nnunet_ape.io import read_volume, write_volume
from nnunet_ape.phantoms import write_cohort
from nnunet_ape.plots import embedding_overlay_png
from nnunet_ape.position_fit import position_r2
from nnunet_ape.pretrain.batches import BatchConfig
from nnunet_ape.pretrain.train_ape import COARSE_SPACING_RANGE, LAST, PretrainConfig, pretrain_ape

# settings that learn a usable map within minutes on a laptop CPU (the paper's run is 150k batches on a GPU)
DEMO_BATCH = dict(variant="naive", pairs=4, voxels=1024, patch_volume=300_000, spacing_range=COARSE_SPACING_RANGE)
DEMO_LR = 2e-3


def run_demo(
    out: Path, cases: int = 12, minutes: float = 3.0, model: str = "small", device: str = "auto",
    workers: int = 2, seed: int = 0, resume: bool = False,
) -> Path:
    """Generate ``cases + 1`` phantoms, pretrain on ``cases`` for ``minutes``, embed the held-out one.

    Writes into ``out``: ``cohort/`` (nnU-Net raw layout), ``ape/`` (pretraining run), ``heldout_ape.nii.gz``,
    ``heldout_ape.png`` and ``report.md``; returns the report path.
    """
    out = Path(out)
    if cases < 2:
        raise InputError(f"--cases {cases}: at least 2 phantoms are needed for pretraining")
    if out.exists() and any(out.iterdir()) and not resume:
        raise InputError(f"{out}: already exists; choose a new folder or pass --resume to continue that demo")
    began = time.monotonic()
    cohort = out / "cohort"
    if not (cohort / "dataset.json").exists():
        print(f"[1/3] writing {cases + 1} synthetic CT phantoms to {cohort}")
        write_cohort(cohort, cases + 1, seed=seed)
    images = nnunet_images(cohort)
    train, heldout = images[:-1], images[-1]
    run = out / "ape"
    cfg = PretrainConfig(
        iterations=1_000_000, lr=DEMO_LR, lr_schedule="cosine", model=model, batch=BatchConfig(**DEMO_BATCH), device=device,
        workers=workers, checkpoint_every=200, max_minutes=minutes, seed=seed,
    )
    print(f"[2/3] pretraining APE ({model}) for {minutes:g} min on {len(train)} phantoms")
    checkpoint = pretrain_ape(train, run, cfg, resume=(run / LAST).exists())
    print(f"[3/3] embedding held-out phantom {heldout.name}")
    net, state = load_ape_model(checkpoint)
    ct = read_volume(heldout)
    t0 = time.perf_counter()
    embedding = embed_volume(net, ct, stored_settings(state), device=resolve_device(device))
    embed_seconds = time.perf_counter() - t0
    write_volume(embedding, out / "heldout_ape.nii.gz")
    embedding_overlay_png(ct, embedding, out / "heldout_ape.png", title=f"held-out phantom {heldout.name}: APE map")
    body = ct.array > -500
    r2 = position_r2(embedding, body)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(cohort / "labelsTr" / heldout.name.replace("_0000", ""))))
    report = _report(out, run, state, r2, embed_seconds, ct.shape, len(np.unique(labels)) - 1, time.monotonic() - began)
    print(report)
    return out / "report.md"


def _report(out: Path, run: Path, state: dict, r2: float, embed_seconds: float, shape, n_labels: int, seconds: float) -> str:
    with open(run / "log.csv", newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    first, last = np.mean(losses[:50]), np.mean(losses[-50:])
    text = "\n".join(
        [
            "# nnunet-ape demo report",
            "",
            f"- pretraining: {state['iteration']} iterations, loss {first:.3f} (first 50) -> {last:.3f} (last 50); curve: `ape/loss.png`",
            f"- held-out phantom: {shape[0]}x{shape[1]}x{shape[2]} voxels, {n_labels} organ labels; embedded in {embed_seconds:.2f} s",
            f"- position encoded by the map: R^2 = {r2:.3f} of a linear fit embedding -> position (mm) over the body",
            "  (1 = position is an affine function of the embedding; 0 = no information)",
            "- files: `heldout_ape.nii.gz` (3-channel map in the phantom's geometry), `heldout_ape.png` (overlay), `ape/checkpoint_final.pt`",
            f"- total time {seconds / 60:.1f} min",
            "",
        ]
    )
    (out / "report.md").write_text(text)
    return text
