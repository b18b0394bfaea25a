"""``nnunet-ape demo``: the whole APE pipeline on built-in synthetic phantoms, no user data and no downloads: pretrain,
embed, localize, and an nnU-Net crop dataset with the commands that train stock nnU-Net on it and paste back."""

from __future__ import annotations

import csv
import json
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


# iterations that give the demo's tiny model a usable map (test_localize_phantoms measures it at this count)
DEMO_ITERATIONS = 2000


def run_demo(
    out: Path, cases: int = 12, minutes: float = 10.0, model: str = "tiny", device: str = "auto",
    workers: int = 2, seed: int = 0, resume: bool = False, iterations: int = DEMO_ITERATIONS,
) -> Path:
    """Generate ``cases + 1`` phantoms, pretrain on ``cases`` for ``iterations`` (stopping early after ``minutes``),
    embed the held-out one; the report says plainly when the time cap cut the pretraining short.

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
        print(f"[1/4] writing {cases + 1} synthetic CT phantoms to {cohort}")
        write_cohort(cohort, cases + 1, seed=seed)
    images = nnunet_images(cohort)
    train, heldout = images[:-1], images[-1]
    run = out / "ape"
    cfg = PretrainConfig(
        iterations=iterations, lr=DEMO_LR, lr_schedule="cosine", model=model, batch=BatchConfig(**DEMO_BATCH), device=device,
        workers=workers, checkpoint_every=200, max_minutes=minutes, seed=seed,
    )
    print(f"[2/4] pretraining APE ({model}) for {iterations} iterations (at most {minutes:g} min) on {len(train)} phantoms")
    checkpoint = pretrain_ape(train, run, cfg, resume=(run / LAST).exists())
    print(f"[3/4] embedding held-out phantom {heldout.name}")
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
    print("[4/4] nnU-Net organ crops: 3-shot liver localizer, crop-dataset of the cohort")
    crops = demo_crop_dataset(out, cohort, checkpoint, str(resolve_device(device)))
    report = _report(out, run, state, r2, embed_seconds, ct.shape, len(np.unique(labels)) - 1, time.monotonic() - began, crops,
                     iterations, minutes)
    print(report)
    return out / "report.md"


def demo_crop_dataset(out: Path, cohort: Path, checkpoint: Path, device: str, organ: str = "liver", shots: int = 3) -> dict:
    """Fit a ``shots``-shot localizer for ``organ`` on the first phantoms and write the cohort as an nnU-Net crop
    dataset ``out/nnUNet_raw/Dataset900_DemoLiverCrop`` (what ``nnunet-ape crop-dataset`` writes); returns its
    manifest."""
    from nnunet_ape.cases import cases_from_nnunet
    from nnunet_ape.localize.fit import fit_localizer
    from nnunet_ape.localize.localizer import save_localizer
    from nnunet_ape.nnunet.crop_dataset import DEFAULT_MARGIN_MM, CropJob, run_job
    from nnunet_ape.nnunet.raw_dataset import open_raw_dataset

    target = out / "nnUNet_raw" / "Dataset900_DemoLiverCrop"
    localizer_path = out / f"{organ}_localizer.json"
    cases = cases_from_nnunet(str(cohort))
    if not localizer_path.exists():
        localizer = fit_localizer(cases[:shots], {organ: cases[0].labels[organ]}, checkpoint, device)
        save_localizer(localizer, localizer_path)
    if target.exists():  # a resumed demo that got this far
        return json.loads((target / "crops.json").read_text())
    models_args = {"localizer_path": localizer_path, "organs": [organ], "channels": (), "ape_path": None, "bpr_path": None, "device": device}
    job = CropJob(open_raw_dataset(str(cohort)), target, [organ], False, DEFAULT_MARGIN_MM, models_args, 1,
                  {"source": str(cohort.resolve()), "organs": [organ]})
    return run_job(job)


def _report(out: Path, run: Path, state: dict, r2: float, embed_seconds: float, shape, n_labels: int, seconds: float,
            crops: dict, iterations: int, minutes: float) -> str:
    with open(run / "log.csv", newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    first, last = np.mean(losses[:50]), np.mean(losses[-50:])
    text = "\n".join(
        [
            "# nnunet-ape demo report",
            "",
            *_cut_short_lines(state["iteration"], iterations, minutes),
            f"- pretraining: {state['iteration']} iterations, loss {first:.3f} (first 50) -> {last:.3f} (last 50); curve: `ape/loss.png`",
            f"- held-out phantom: {shape[0]}x{shape[1]}x{shape[2]} voxels, {n_labels} organ labels; embedded in {embed_seconds:.2f} s",
            f"- position encoded by the map: R^2 = {r2:.3f} of a linear fit embedding -> position (mm) over the body",
            "  (1 = position is an affine function of the embedding; 0 = no information)",
            "- files: `heldout_ape.nii.gz` (3-channel map in the phantom's geometry), `heldout_ape.png` (overlay), `ape/checkpoint_final.pt`",
            *_crop_lines(out, crops),
            f"- total time {seconds / 60:.1f} min",
            "",
        ]
    )
    (out / "report.md").write_text(text)
    return text


def _cut_short_lines(done: int, planned: int, minutes: float) -> list[str]:
    if done >= planned:
        return []
    return [
        f"**Pretraining was cut short: the {minutes:g}-minute cap ended it after {done} of {planned} iterations** (a busy or "
        f"slow machine). The map and the localizer below are weaker than the demo's should be; `nnunet-ape demo -o "
        f"SAME_FOLDER --resume --minutes M` continues the pretraining.",
        "",
    ]


def _crop_lines(out: Path, crops: dict) -> list[str]:
    s = crops["summary"]
    liver = s["organ_fraction_in_predicted_box"].get("liver", {})
    raw = (out / "nnUNet_raw").resolve()
    chosen = json.loads((out / "liver_localizer.json").read_text())["organs"]["liver"]["method"]
    return [
        f"- nnU-Net crop dataset `nnUNet_raw/{crops['dataset']}`: {s['training_cases']} phantoms cropped to the liver "
        f"(3-shot localizer `liver_localizer.json`, method chosen on the shots: {chosen}); voxels source / crop median {s['voxel_ratio']['median']:.1f}x; the localizer's "
        f"box held {liver.get('mean', float('nan')):.3f} of the liver on average (min {liver.get('min', float('nan')):.3f}); "
        f"{s['training_boxes_grown']} training box(es) grown to hold the whole liver; boxes per case in `crops.json`",
        "- train stock nnU-Net on it and paste predictions back onto the phantoms:",
        "",
        "  ```",
        f"  export nnUNet_raw={raw} nnUNet_preprocessed={raw.parent / 'nnUNet_preprocessed'} nnUNet_results={raw.parent / 'nnUNet_results'}",
        "  nnUNetv2_plan_and_preprocess -d 900 -c 3d_fullres --verify_dataset_integrity && nnUNetv2_train 900 3d_fullres 0",
        f"  nnUNetv2_predict -i $nnUNet_raw/{crops['dataset']}/imagesTr -o pred900 -d 900 -c 3d_fullres -f 0 && nnunet-ape uncrop -i pred900 -o seg/",
        f"  nnunet-ape predict -i {(out / 'cohort' / 'imagesTr').resolve()} -o seg_localized/ -d 900 -c 3d_fullres -f 0   # or all in one: localize, crop, nnU-Net, paste back",
        "  ```",
    ]
