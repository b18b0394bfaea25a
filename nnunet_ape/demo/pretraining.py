"""The demo's APE pretraining: settings that learn a usable map on the phantoms within minutes on a CPU (the paper's
run is 150k batches on a GPU), and the held-out phantom's map as a picture."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np

from nnunet_ape.checkpoint import load_ape_model
from nnunet_ape.distributed import resolve_device
from nnunet_ape.embed import embed_volume, stored_settings
from nnunet_ape.io import read_volume, write_volume
from nnunet_ape.plots import embedding_overlay_png
from nnunet_ape.position_fit import position_r2
from nnunet_ape.pretrain.batches import BatchConfig
from nnunet_ape.pretrain.train_ape import COARSE_SPACING_RANGE, LAST, PretrainConfig, pretrain_ape

DEMO_BATCH = dict(variant="naive", pairs=4, voxels=1024, patch_volume=300_000, spacing_range=COARSE_SPACING_RANGE)
DEMO_LR = 2e-3
# iterations that give the demo's tiny model a usable map (test_localize_phantoms measures it at this count)
DEMO_ITERATIONS = 2000


def pretrain(images: list[Path], run: Path, iterations: int, minutes: float, model: str, device: str, workers: int,
             seed: int) -> Path:
    """Pretrain an APE ``model`` on the CT files ``images`` into ``run`` (resuming a run found there) for
    ``iterations``, stopping after ``minutes``; returns the final checkpoint."""
    cfg = PretrainConfig(
        iterations=iterations, lr=DEMO_LR, lr_schedule="cosine", model=model, batch=BatchConfig(**DEMO_BATCH), device=device,
        workers=workers, checkpoint_every=200, max_minutes=minutes, seed=seed,
    )
    return pretrain_ape(images, run, cfg, resume=(run / LAST).exists())


def embed_heldout(checkpoint: Path, image: Path, out: Path, device: str) -> dict:
    """Embed one held-out phantom CT ``image``: ``out/heldout_ape.nii.gz`` (3-channel map on its grid) and
    ``out/heldout_ape.png`` (overlay). Returns ``{"iteration", "r2", "seconds", "shape"}``: the checkpoint's
    iteration, the R^2 of a linear fit embedding -> position (mm) over the body, the embedding seconds, the CT's
    shape ``(X, Y, Z)``."""
    net, state = load_ape_model(checkpoint)
    ct = read_volume(image)
    began = time.perf_counter()
    embedding = embed_volume(net, ct, stored_settings(state), device=resolve_device(device))
    seconds = time.perf_counter() - began
    write_volume(embedding, out / "heldout_ape.nii.gz")
    embedding_overlay_png(ct, embedding, out / "heldout_ape.png", title=f"held-out phantom {image.name}: APE map")
    return {"iteration": int(state["iteration"]), "r2": position_r2(embedding, ct.array > -500), "seconds": seconds,
            "shape": tuple(ct.shape)}


def loss_summary(run: Path) -> tuple[float, float]:
    """Mean pretraining loss of the first and of the last 50 iterations logged in ``run/log.csv``."""
    with open(run / "log.csv", newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    return float(np.mean(losses[:50])), float(np.mean(losses[-50:]))
