"""Benchmark: the localizer fitted on a whole training set, on new cases and on new cases cut to other fields of view.

The head-and-neck cohort (:mod:`headneck_split`): ``localize fit`` on the 163 training cases (every case that
contours an organ is a shot for it, as a user fits on a training set), then on each of the 40 test cases, as they
are and cut to ``--cuts`` random z-extents each (up to ``--max-cut`` of the body's slices removed at each end,
independently; geometry kept): the crop box of every method the localizer has (the body box, APE 6 points, APE
all voxels) and of the method it chose per organ, each measured as the fraction of the organ (its voxels left in
the scan) inside the crop (recall), and the volume ratio (image / crop). "Lost": an organ present in the scan with
no voxel in its crop, the worst outcome (nnU-Net then predicts nothing there and regrowth never triggers).

    python benchmarks/bench_headneck_fov.py --model CHECKPOINT [--cuts 3] [--max-cut 0.3] [--work /tmp/bench_headneck_fov]

Prints the machine, the date, per organ and method: mean recall, the share of cases keeping >= 0.99 (coverage),
the lowest recall, organs lost, the geometric-mean volume ratio; then the mean over organs. The last column, the
organ's own tight box, is the scale of the volume ratios: what a perfect localizer gives before any enlargement. Writes
``WORK/fov.json`` (every case's figures) and ``WORK/fov.md``; the fitted localizer is ``WORK/localizer.json``
(reused with ``--reuse``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import machine  # noqa: E402
from headneck_split import HEADNECK, split  # noqa: E402

from nnunet_ape.cli.common import COMBINE_CHOICES, DEFAULT_COMBINE  # noqa: E402

# crop: what the localizer crops with (its choice, safety net included); chosen: the chosen method without the net;
# true_box: the organ's own tight box in the scan (no localizer: the volume ratio a perfect, unenlarged box gives)
METHODS = ("crop", "chosen", "body_box", "ape", "ape_all", "true_box")
TITLES = {"crop": "localizer's crop", "chosen": "chosen, no safety net", "body_box": "body box", "ape": "APE 6 points",
          "ape_all": "APE all voxels", "true_box": "the organ's true box"}


def z_cut(ct, label: np.ndarray, rng: np.random.Generator, max_cut: float):
    """``(ct, label)`` cut along the CT's cranio-caudal axis: up to ``max_cut`` of the body's slices removed at each
    end (uniform, independent); the CT's geometry kept (origin moved to the first kept slice)."""
    from nnunet_ape.io import Volume, canonical_orientation
    from nnunet_ape.localize.body import body_mask

    axis = canonical_orientation(ct.direction).perm[2]
    other = tuple(a for a in range(3) if a != axis)
    has_body = np.flatnonzero(body_mask(ct.array, axis).any(axis=other))
    first, last = int(has_body[0]), int(has_body[-1])
    n = last - first + 1
    lo = first + int(rng.uniform(0, max_cut) * n)
    hi = last - int(rng.uniform(0, max_cut) * n)
    index = [slice(None)] * 3
    index[axis] = slice(lo, hi + 1)
    corner = np.zeros(3)
    corner[axis] = lo
    origin = tuple(ct.index_to_physical(corner[None])[0])
    return Volume(ct.array[tuple(index)], ct.spacing, origin, ct.direction), label[tuple(index)], (lo, hi)


def measure_case(localizer: dict, model, settings, ct, label: np.ndarray, organs: dict[str, int]) -> dict:
    """Per organ present in ``label``: {method: [recall, volume ratio]} and the localizer's own method and flags."""
    from nnunet_ape.embed import embed_volume
    from nnunet_ape.localize.boxes import box_recall, mask_box, volume_ratio
    from nnunet_ape.localize.predict_boxes import predict_organ_boxes

    embedding = embed_volume(model, ct, settings, progress=False)
    boxes = predict_organ_boxes(localizer, ct, embedding, None, list(organs))
    out = {}
    for organ, value in organs.items():
        mask = label == value
        if not mask.any():
            continue
        entry = boxes[organ]
        own = entry["crop_boxes_voxels"]
        crops = {"crop": np.asarray(entry["crop_box_voxels"]), "chosen": np.asarray(own[entry["method"]]),
                 **{m: np.asarray(b) for m, b in own.items()}, "true_box": mask_box(mask)}
        out[organ] = {"method": entry["method"], "safety_net": entry.get("safety_net", False),
                      **{m: [box_recall(mask, b), volume_ratio(mask.shape, b)] for m, b in crops.items() if m in METHODS}}
    return out


def summarize(rows: list[dict], organs: list[str]) -> tuple[str, dict]:
    """Markdown table per organ and method over ``rows`` (per case: :func:`measure_case`), and the means."""
    lines = ["| organ | cases | " + " | ".join(f"{TITLES[m]}: recall mean / >=0.99 / min / lost / VR" for m in METHODS) + " |",
             "|" + "---|" * (len(METHODS) + 2)]
    means: dict[str, dict[str, list]] = {m: {"recall": [], "coverage": [], "lost": [], "vr": []} for m in METHODS}
    for organ in organs:
        found = [r[organ] for r in rows if organ in r]
        cells = []
        for m in METHODS:
            values = np.array([f[m] for f in found if m in f])
            if not len(values):
                cells.append("-")
                continue
            recall, vr = values[:, 0], values[:, 1]
            coverage, lost, gvr = float(np.mean(recall >= 0.99)), int(np.sum(recall == 0)), float(np.exp(np.mean(np.log(vr))))
            cells.append(f"{recall.mean():.3f} / {coverage:.3f} / {recall.min():.3f} / {lost} / {gvr:.1f}")
            for key, v in (("recall", recall.mean()), ("coverage", coverage), ("lost", lost), ("vr", gvr)):
                means[m][key].append(v)
        chosen = sorted({f["method"] for f in found})
        nets = sum(f["safety_net"] for f in found)
        lines.append(f"| {organ} ({', '.join(chosen)}{f'; safety net {nets}x' if nets else ''}) | {len(found)} | " + " | ".join(cells) + " |")
    summary = {m: {"recall": float(np.mean(v["recall"])), "coverage": float(np.mean(v["coverage"])), "lost": int(np.sum(v["lost"])),
                   "min_coverage": float(np.min(v["coverage"])), "vr_geomean": float(np.exp(np.mean(np.log(v["vr"]))))}
               for m, v in means.items() if v["recall"]}
    lines.append("| **mean** | | " + " | ".join(
        f"{s['recall']:.3f} / {s['coverage']:.3f} (min {s['min_coverage']:.3f}) / - / {s['lost']} / {s['vr_geomean']:.1f}"
        if (s := summary.get(m)) else "-" for m in METHODS) + " |")
    return "\n".join(lines), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="APE checkpoint (pretrained on the training cases only)")
    parser.add_argument("--data", type=Path, default=HEADNECK)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_headneck_fov"))
    parser.add_argument("--ape-boxes", default="all-voxels", choices=("all-voxels", "edge-points"))
    parser.add_argument("--cuts", type=int, default=3, help="random z-extents per test case")
    parser.add_argument("--max-cut", type=float, default=0.3, help="most of the body's slices removed at each end")
    parser.add_argument("--enlargement", default="margins", choices=("margins", "alpha"),
                        help="localize fit --enlargement: face margins in mm (default since 2026-12-05) or the paper's alpha")
    parser.add_argument("--combine", default=DEFAULT_COMBINE, choices=COMBINE_CHOICES,
                        help="localize fit --combine: how the shots' boxes are combined [trimmed since 2026-12-06; mean before]")
    parser.add_argument("--shots", type=int, default=None, help="shots per organ (default: every training case contouring it)")
    parser.add_argument("--test-cases", type=int, default=None, help="the first N test cases only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="reuse WORK/localizer.json")
    args = parser.parse_args()

    from tqdm import tqdm

    from nnunet_ape.checkpoint import load_ape_model
    from nnunet_ape.cases import cases_from_nnunet, read_case
    from nnunet_ape.localize.fit import fit_localizer
    from nnunet_ape.localize.localizer import embed_settings_for, save_localizer

    train, test = split(cases_from_nnunet(str(args.data)))
    test = test[: args.test_cases]
    organs = {k: v for k, v in train[0].labels.items() if v}
    print(f"machine: {machine()}; date {time.strftime('%Y-%m-%d')}")
    print(f"enlargement: {args.enlargement}; shots' boxes combined: {args.combine}; shots: {len(train)} training cases ({args.shots or 'all'} per organ), tests: {len(test)} cases x (1 + {args.cuts} cuts)")
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / "localizer.json"
    fit_seconds = None
    if not (args.reuse and path.exists()):
        began = time.perf_counter()
        save_localizer(fit_localizer(train, organs, args.model, ape_boxes=args.ape_boxes, shots=args.shots,
                                    enlargement=args.enlargement, combine=args.combine), path)
        fit_seconds = time.perf_counter() - began
    localizer = json.loads(path.read_text())
    print(f"localizer fit: {fit_seconds if fit_seconds is None else round(fit_seconds)} s; methods: " +
          ", ".join(f"{o} {e['method']}" for o, e in localizer["organs"].items()))
    model, _ = load_ape_model(args.model)
    settings = embed_settings_for(args.model)
    rng = np.random.default_rng(args.seed)
    full, cut = [], []
    began = time.perf_counter()
    for case in tqdm(test, desc="test cases", unit="case"):
        ct, label = read_case(case)
        full.append(measure_case(localizer, model, settings, ct, label, organs))
        for _ in range(args.cuts):
            small, small_label, _extent = z_cut(ct, label, rng, args.max_cut)
            cut.append(measure_case(localizer, model, settings, small, small_label, organs))
    seconds = time.perf_counter() - began
    full_table, full_mean = summarize(full, list(organs))
    cut_table, cut_mean = summarize(cut, list(organs))
    text = "\n".join([
        f"# Localizer fitted on the training split, on the test cases ({time.strftime('%Y-%m-%d')}, {machine()})", "",
        f"Model: {args.model}; ape boxes {args.ape_boxes}; shots per organ: " +
        ", ".join(f"{o} {len(e['shot_cases'])}" for o, e in localizer["organs"].items()),
        f"Methods chosen: " + ", ".join(f"{o} {e['method']}" for o, e in localizer["organs"].items()),
        f"Fit {fit_seconds and round(fit_seconds)} s; localizing {len(full) + len(cut)} scans {seconds:.0f} s", "",
        "## Test cases as they are", "", full_table, "",
        f"## Test cases cut to random z-extents ({args.cuts} per case, up to {args.max_cut:.0%} of the body's slices at each end)", "",
        cut_table, "",
        "Cells: mean recall / share of cases with recall >= 0.99 / lowest recall / cases with recall 0 (organ lost) / "
        "geometric-mean volume ratio (image / crop). Mean row: the organs' means; coverage min = the lowest organ's.", ""])
    (args.work / "fov.md").write_text(text)
    (args.work / "fov.json").write_text(json.dumps({"full": full, "cut": cut, "mean_full": full_mean, "mean_cut": cut_mean,
                                                     "fit_seconds": fit_seconds}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
