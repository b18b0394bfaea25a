"""Benchmark: what sets the crops' size when the localizer is fitted on a whole training set.

The head-and-neck cohort (:mod:`headneck_split`): ``localize fit`` on the 163 training cases (``--ape-boxes
all-voxels``, every contouring case a shot), recording every shot's held-out raw box per method (body box, APE 6
points, APE all voxels), then the raw boxes of the same methods on the 40 test cases, as they are and cut to 3 random
z-extents each (the cuts of ``bench_headneck_fov.py``, same seed). From these, without refitting:

1. the tail of the face-margin calibration: per organ and method the quantiles of the shots' ``t`` (the margin
   multiple each shot's held-out box needs to keep 0.99 of its organ) against the stored ``t`` (the largest below
   199 shots), and the shots that set it, with their organ's volume against the median;
2. calibrating without the shots whose organ is 4x off the median volume (``fit``'s warning): stored ``t``, test
   coverage and volume ratio;
3. fused boxes: the mean of the body box and an APE box, calibrated like the others;
4. the safety net's trigger: the union with the body box's crop below the ``q`` quantile of the shots' agreement.

    python benchmarks/bench_headneck_calibration.py --model CHECKPOINT [--work /tmp/bench_headneck_calibration]

Prints the machine, the date and the tables (coverage: share of organ-cases keeping >= 0.99, mean over organs, and
the lowest organ's; VR: geometric mean over organs of the per-organ geometric-mean volume ratio). ``WORK/raw.pkl``
keeps the boxes (``--reuse`` skips the fit and localization).
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import machine  # noqa: E402
from bench_headneck_fov import z_cut  # noqa: E402
from headneck_split import HEADNECK, split  # noqa: E402

METHODS = ("body_box", "ape", "ape_all")
FUSED = {"fused_ape": "ape", "fused_ape_all": "ape_all"}  # mean of the body box and this APE box


def collect(model: Path, data: Path, cuts: int, max_cut: float, seed: int) -> dict:
    """Fit on the training split, recording each organ's shots (masks, spacings, held-out raw boxes per method);
    raw boxes per method on the test cases and their cuts. Returns ``{"shots", "tests", "localizer", "seconds"}``."""
    from nnunet_ape.canonical import canonical_ct
    from nnunet_ape.cases import cases_from_nnunet, read_case
    from nnunet_ape.checkpoint import load_ape_model
    from nnunet_ape.embed import CanonicalMap, embed_volume
    from nnunet_ape.localize import fit as fit_module
    from nnunet_ape.localize.body import body_box
    from nnunet_ape.localize.choice import box_in_body
    from nnunet_ape.localize.fewshot import predict_box
    from nnunet_ape.localize.localizer import embed_settings_for
    from nnunet_ape.localize.masks import CroppedMask
    from nnunet_ape.localize.predict_boxes import _transfer_neighbours, searchable_map

    train, test = split(cases_from_nnunet(str(data)))
    organs = {k: v for k, v in train[0].labels.items() if v}
    recorded = []
    original = fit_module.selection_scores

    def recording(masks, held, target, ape_xy="ape", bpr=None, needed=None, scales=None, spacings=None):
        recorded.append({"masks": masks, "held": {m: [np.asarray(b) for b in v] for m, v in held.items()}, "spacings": spacings})
        return original(masks, held, target, ape_xy, bpr, needed, scales, spacings)

    began = time.perf_counter()
    fit_module.selection_scores = recording
    try:
        localizer = fit_module.fit_localizer(train, organs, model, ape_boxes="all-voxels")
    finally:
        fit_module.selection_scores = original
    fit_seconds = time.perf_counter() - began
    shots = dict(zip(organs, recorded))  # selection_scores runs once per organ, in order
    ape, _ = load_ape_model(model)
    settings = embed_settings_for(model)
    rng = np.random.default_rng(seed)

    def raw_boxes(ct, label) -> dict:
        canon = canonical_ct(ct)
        canon_label = canon.array_to_canonical(label)
        embedding = CanonicalMap.from_source_grid(embed_volume(ape, ct, settings, progress=False), canon)
        searchable = searchable_map(embedding)
        body = body_box(canon.canon.array)
        neighbours = _transfer_neighbours(localizer, canon.canon, body, searchable)
        out = {"spacing": tuple(canon.canon.spacing), "organs": {}}
        for organ, entry in localizer["organs"].items():
            mask = canon_label == entry["label"]
            if not mask.any():
                continue
            edges = [np.asarray(s["edge_embeddings"]) for s in entry["shots"]]
            sides = [np.asarray(s["cut_sides"], dtype=bool) for s in entry["shots"]]
            edge_box, _ = predict_box(edges, searchable, localizer["combine"], sides)
            found = neighbours.organ_box(entry["label"], localizer["label_transfer"]["threshold"])
            out["organs"][organ] = {"mask": CroppedMask(mask), "body_box": box_in_body(entry["body_box"]["relative"], body),
                                    "ape": edge_box, "ape_all": found if found is not None else edge_box}
        return out

    tests = []
    for case in test:
        ct, label = read_case(case)
        tests.append({"kind": "full", **raw_boxes(ct, label)})
        for _ in range(cuts):
            small, small_label, _extent = z_cut(ct, label, rng, max_cut)
            tests.append({"kind": "cut", **raw_boxes(small, small_label)})
    return {"shots": shots, "tests": tests, "localizer": localizer,
            "seconds": {"fit": fit_seconds, "total": time.perf_counter() - began}}


def box_of(parts: dict, method: str) -> np.ndarray:
    """A method's raw box from ``parts`` (per method): the fused ones are the mean of the body box and an APE box."""
    if method in FUSED:
        return 0.5 * np.asarray(parts["body_box"]) + 0.5 * np.asarray(parts[FUSED[method]])
    return np.asarray(parts[method])


def calibrate(shots: dict, keep: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray, list, list, list]:
    """Face margins of ``method`` calibrated on the shots ``keep`` (indices): (margins mm, each shot's t, held-out
    boxes, masks, spacings)."""
    from nnunet_ape.localize.margins import calibrated_margins, face_scale, shot_ts

    held = [box_of({m: shots["held"][m][i] for m in METHODS}, method) for i in keep]
    masks = [shots["masks"][i] for i in keep]
    spacings = [shots["spacings"][i] for i in keep]
    scale = face_scale(held, [m.box() for m in masks], spacings)
    ts = np.asarray(shot_ts(held, masks, scale, spacings, 0.99))
    return calibrated_margins(list(ts), scale)[0], ts, held, masks, spacings


def measure(tests: list, organ: str, method: str, margins: np.ndarray, kind: str, body_margins=None,
            threshold: float | None = None) -> tuple[float, int, float, int]:
    """(coverage, organs lost, geometric-mean VR, nets fired) of ``method``'s crops on the ``kind`` test scans;
    with ``threshold`` the crop joins the body box's where it lies inside it less than that."""
    from nnunet_ape.localize.boxes import box_inside_fraction, box_recall, volume_ratio
    from nnunet_ape.localize.margins import grow_box

    recalls, ratios, fired = [], [], 0
    for scan in tests:
        if scan["kind"] != kind or organ not in scan["organs"]:
            continue
        parts = scan["organs"][organ]
        shape = parts["mask"].shape
        crop = grow_box(box_of(parts, method), margins, scan["spacing"], shape)
        if threshold is not None:
            body = grow_box(parts["body_box"], body_margins, scan["spacing"], shape)
            if box_inside_fraction(crop, body) < threshold:
                crop, fired = np.stack([np.minimum(crop[0], body[0]), np.maximum(crop[1], body[1])]), fired + 1
        recalls.append(box_recall(parts["mask"], crop))
        ratios.append(volume_ratio(shape, crop))
    recalls = np.asarray(recalls)
    return float(np.mean(recalls >= 0.99)), int(np.sum(recalls == 0)), float(np.exp(np.mean(np.log(ratios)))), fired


def summary(rows: list[tuple]) -> str:
    """``coverage mean (min) / lost / VR`` over organs of (coverage, lost, VR, ...) rows."""
    cov = [r[0] for r in rows]
    return (f"{np.mean(cov):.3f} ({min(cov):.3f}) / {sum(r[1] for r in rows)} / "
            f"{np.exp(np.mean(np.log([r[2] for r in rows]))):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="APE checkpoint (pretrained on the training cases only)")
    parser.add_argument("--data", type=Path, default=HEADNECK)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_headneck_calibration"))
    parser.add_argument("--cuts", type=int, default=3)
    parser.add_argument("--max-cut", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="reuse WORK/raw.pkl")
    args = parser.parse_args()

    from nnunet_ape.localize.boxes import box_inside_fraction
    from nnunet_ape.localize.fit import volume_outliers
    from nnunet_ape.localize.margins import grow_box

    print(f"machine: {machine()}; date {time.strftime('%Y-%m-%d')}", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / "raw.pkl"
    if args.reuse and store.exists():
        raw = pickle.loads(store.read_bytes())
    else:
        raw = collect(args.model, args.data, args.cuts, args.max_cut, args.seed)
        store.write_bytes(pickle.dumps(raw))
    print(f"fit {raw['seconds']['fit']:.0f} s, fit + test boxes {raw['seconds']['total']:.0f} s", flush=True)
    shots, tests, names = raw["shots"], raw["tests"], {o: e["shot_cases"] for o, e in raw["localizer"]["organs"].items()}

    print("\n## 1. The calibration's tail: each shot's t (face-margin multiple for 0.99 of its organ)\n")
    print("| organ | method | shots | t median / 90% / 98% | stored t (largest) | shots that set it (t; volume / median) |")
    print("|---|---|---|---|---|---|")
    keeps = {}
    for organ, s in shots.items():
        volumes = [float(m.sum()) * float(np.prod(sp)) for m, sp in zip(s["masks"], s["spacings"])]
        flagged = {n for n, _ in volume_outliers(names[organ], volumes)}
        keeps[organ] = (np.arange(len(volumes)), np.array([i for i, n in enumerate(names[organ]) if n not in flagged]))
        median = np.median(volumes)
        for method in METHODS:
            _, ts, *_ = calibrate(s, keeps[organ][0], method)
            top = np.argsort(ts)[-2:][::-1]
            print(f"| {organ} | {method} | {len(ts)} | {np.median(ts):.2f} / {np.quantile(ts, 0.9):.2f} / "
                  f"{np.quantile(ts, 0.98):.2f} | {ts.max():.2f} | " +
                  ", ".join(f"{names[organ][i]} ({ts[i]:.2f}; {volumes[i] / median:.2g}x)" for i in top) + " |")

    print("\n## 2-4. Test coverage / organs lost / VR (as they are; cut z-extents)\n")
    print("| crops | as they are | cut z-extents |")
    print("|---|---|---|")
    organs = list(shots)
    for robust in (False, True):
        calibrated = {(o, m): calibrate(shots[o], keeps[o][int(robust)], m) for o in organs for m in (*METHODS, *FUSED)}
        label = "without the volume outliers" if robust else "every shot"
        for method in (*METHODS, *FUSED):
            cells = [summary([measure(tests, o, method, calibrated[(o, method)][0], kind) for o in organs]) for kind in ("full", "cut")]
            print(f"| {method}, calibrated on {label} | {cells[0]} | {cells[1]} |")
        for method in ("ape", "ape_all"):
            for q in (0.0, 0.02, 0.05, 0.1):
                thresholds = {}
                for o in organs:
                    margins, _, held, masks, spacings = calibrated[(o, method)]
                    body_margins, _, body_held, *_ = calibrated[(o, "body_box")]
                    inside = [box_inside_fraction(grow_box(h, margins, sp, m.shape), grow_box(b, body_margins, sp, m.shape))
                              for h, b, m, sp in zip(held, body_held, masks, spacings)]
                    thresholds[o] = float(np.quantile(inside, q))
                cells = [summary([measure(tests, o, method, calibrated[(o, method)][0], kind, calibrated[(o, "body_box")][0],
                                          thresholds[o]) for o in organs]) for kind in ("full", "cut")]
                print(f"| {method} + net at the shots' {q:.0%} agreement quantile, calibrated on {label} | {cells[0]} | {cells[1]} |")
    print("\nCells: share of organ-cases keeping >= 0.99, mean over organs (the lowest organ's) / organs lost / "
          "geometric-mean volume ratio over organs.")


if __name__ == "__main__":
    main()
