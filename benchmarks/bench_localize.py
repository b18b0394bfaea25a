"""Benchmark: localization time per case (embedding + exact retrieval of edge points, and label transfer over
all voxels) on a 512x512x300 volume, and the evaluation tables (APE's 6 points and all voxels vs the body-box
baseline, measured in the same run) on a synthetic cohort and on the
labeled real patients A and B of ../shared/data.

    python benchmarks/bench_localize.py --model runs/ape/checkpoint_final.pt [--device cuda]

Without --model only the timing runs (with random 'base' weights: speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_embed import DATA, large_volume, machine

ORGANS_AB = ["liver", "spleen", "stomach", "pancreas", "aorta", "inferior_vena_cava"]  # labeled in both A and B


def time_localization(device: str, organs: int = 13, shots: int = 5) -> dict:
    """Seconds to embed a 512x512x300 CT, retrieve ``organs * shots * 6`` edge queries on its map, and transfer
    labels from a full pool of shot samples (``MAX_SAMPLES``, drawn from the same map) to its body grid."""
    import torch

    from nnunet_ape.embed import EmbedSettings, embed_volume
    from nnunet_ape.io import read_volume
    from nnunet_ape.localize.body import body_box
    from nnunet_ape.localize.label_transfer import MAX_SAMPLES, LabelSamples, LabelTransfer, body_grid
    from nnunet_ape.localize.retrieval import nearest_voxels
    from nnunet_ape.models.ape import PRESETS, APENet

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ct.nii.gz"
        large_volume(path)
        volume = read_volume(path)
    model = APENet(PRESETS["base"]).eval()
    settings = EmbedSettings(half=True)
    embed_volume(model, volume, settings, device=device, progress=False)  # warm-up
    t0 = time.perf_counter()
    embedding = embed_volume(model, volume, settings, device=device, progress=False).array
    if device == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    flat = embedding.reshape(-1, 3)
    rng = np.random.default_rng(0)
    queries = flat[rng.integers(0, len(flat), organs * shots * 6)].astype(np.float64) + rng.normal(0, 0.01, (organs * shots * 6, 3))
    nearest_voxels(queries, embedding)
    t2 = time.perf_counter()
    picks = rng.integers(0, len(flat), MAX_SAMPLES)
    samples = LabelSamples(flat[picks].astype(np.float32), (picks % (organs + 1)).astype(np.int32))
    grid = body_grid(body_box(volume.array), volume.spacing, volume.shape)
    neighbours = LabelTransfer(samples).neighbours(embedding, grid)
    for value in range(1, organs + 1):
        neighbours.organ_box(value)
    t3 = time.perf_counter()
    return {"embed_s": t1 - t0, "retrieval_s": t2 - t1, "queries": len(queries), "transfer_s": t3 - t2,
            "grid_points": int(np.prod(grid.dims)), "total_s": t2 - t0}


def _folder_case(root: Path, letter: str) -> None:
    seg = {"a": "ts_a_abdomen_pelvis_seg.nii.gz", "b": "ts_b_upper_abdomen_seg.nii.gz"}[letter]
    ct = {"a": "ts_a_abdomen_pelvis_ct.nii.gz", "b": "ts_b_upper_abdomen_ct.nii.gz"}[letter]
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    (root / "images" / f"case_{letter}_0000.nii.gz").symlink_to(DATA / ct)
    (root / "labels" / f"case_{letter}.nii.gz").symlink_to(DATA / seg)


def evaluation_tables(checkpoint: Path, device: str, cohort_size: int, shots: int) -> dict:
    """Markdown tables of the protocol on a phantom cohort (k = ``shots``) and on patients A and B (1-shot)."""
    from nnunet_ape.checkpoint import load_ape_model
    from nnunet_ape.cases import cases_from_folders, cases_from_nnunet, read_label_names, resolve_organs
    from nnunet_ape.localize.evaluate import evaluate_localization, markdown_tables
    from nnunet_ape.localize.localizer import embed_settings_for
    from nnunet_ape.phantoms import write_cohort

    model, _ = load_ape_model(checkpoint)
    settings = embed_settings_for(checkpoint)
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_cohort(Path(tmp) / "cohort", cohort_size, seed=1234)
        cases = cases_from_nnunet(str(Path(tmp) / "cohort"))
        result = evaluate_localization(cases, resolve_organs(None, cases[0].labels), model, settings, shots, device)
        tables["phantoms"] = markdown_tables(result)
        for letter in "ab":
            _folder_case(Path(tmp) / "ab", letter)
        # A and B name their labels alike but number them differently: one case each, mapped by name
        names_a = read_label_names(DATA / "ts_a_labels.json")
        names_b = read_label_names(DATA / "ts_b_labels.json")
        if any(names_a[o] != names_b[o] for o in ORGANS_AB):
            relabelled = _relabel_b(Path(tmp), names_a, names_b)
            (Path(tmp) / "ab" / "labels" / "case_b.nii.gz").unlink()
            (Path(tmp) / "ab" / "labels" / "case_b.nii.gz").symlink_to(relabelled)
        cases = cases_from_folders(Path(tmp) / "ab" / "images", Path(tmp) / "ab" / "labels", names_a)
        result = evaluate_localization(cases, resolve_organs(ORGANS_AB, names_a), model, settings, 1, device)
        tables["patients A, B"] = markdown_tables(result)
    return tables


def _relabel_b(tmp: Path, names_a: dict, names_b: dict) -> Path:
    """Patient B's label map renumbered to A's numbers for the shared organs (others dropped)."""
    from nnunet_ape.io import read_volume, write_volume

    seg = read_volume(DATA / "ts_b_upper_abdomen_seg.nii.gz")
    out = np.zeros_like(seg.array)
    for organ in ORGANS_AB:
        out[seg.array == names_b[organ]] = names_a[organ]
    return write_volume(seg.with_array(out), tmp / "b_relabelled.nii.gz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="APE checkpoint for the evaluation tables")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cohort", type=int, default=10, help="phantoms in the synthetic evaluation cohort")
    parser.add_argument("--shots", type=int, default=3, help="k for the phantom cohort")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    timing = time_localization(args.device)
    print(f"localization of a 512x512x300 CT on {args.device} ('base' model): embedding {timing['embed_s']:.2f} s + "
          f"exact retrieval of {timing['queries']} queries {timing['retrieval_s']:.2f} s = {timing['total_s']:.2f} s; "
          f"label transfer instead of retrieval: {timing['transfer_s']:.2f} s ({timing['grid_points']} grid points, 13 organs)")
    results = {"machine": machine(), "timing": timing}
    if args.model:
        results["tables"] = evaluation_tables(args.model, args.device, args.cohort, args.shots)
        for name, table in results["tables"].items():
            print(f"\n## {name} (model {args.model})\n\n{table}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
