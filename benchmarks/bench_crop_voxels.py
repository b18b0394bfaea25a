"""Benchmark: how much smaller nnU-Net's input gets with organ crops, per organ, on the real CT of ../shared/data.

For each organ labeled in patients A and B: the voxel ratio (source voxels / crop voxels) of a training crop as
`crop-dataset` cuts it from a perfect localizer (the label's box plus the 10 mm margin: the most a crop can save),
and, with --model, of the crop box of a 1-shot localizer fitted on the other patient (A -> B, B -> A) with the
fraction of the organ that box keeps. Prints the machine and a Markdown table.

    python benchmarks/bench_crop_voxels.py [--model runs/ape/checkpoint_final.pt]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import DATA, machine  # noqa: E402

PATIENTS = {"A": ("ts_a_abdomen_pelvis_ct.nii.gz", "ts_a_abdomen_pelvis_seg.nii.gz", "ts_a_labels.json"),
            "B": ("ts_b_upper_abdomen_ct.nii.gz", "ts_b_upper_abdomen_seg.nii.gz", "ts_b_labels.json")}
ORGANS = ["liver", "spleen", "stomach", "pancreas", "aorta", "inferior_vena_cava", "kidney_left", "kidney_right", "gallbladder"]
MARGIN_MM = 10.0


def case(key: str):
    from nnunet_ape.cases import LabeledCase

    ct, seg, names = PATIENTS[key]
    labels = {v: int(k) for k, v in json.loads((DATA / names).read_text()).items()}
    return LabeledCase(key, DATA / ct, DATA / seg, labels)


def main() -> None:
    from nnunet_ape.checkpoint import load_ape_model
    from nnunet_ape.crop_geometry import box_shape, crop_box, fraction_inside, grow_box, margin_voxels, mask_crop_box
    from nnunet_ape.cases import read_case
    from nnunet_ape.localize.fit import fit_localizer
    from nnunet_ape.localize.predict_boxes import localize_volume

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="APE checkpoint for the 1-shot localizer columns")
    args = parser.parse_args()
    read = {k: read_case(case(k)) for k in PATIENTS}
    model = load_ape_model(args.model)[0] if args.model else None
    rows = []
    for test, shot in (("A", "B"), ("B", "A")):
        ct, label = read[test]
        labels = case(test).labels
        present = [o for o in ORGANS if o in labels and (label == labels[o]).any()]
        boxes = {}
        if args.model:
            shared = [o for o in present if o in case(shot).labels and (read[shot][1] == case(shot).labels[o]).any()]
            localizer = fit_localizer([case(shot)], {o: case(shot).labels[o] for o in shared}, args.model)
            boxes = localize_volume(localizer, ct, model, organs=shared)
        for organ in present:
            mask = label == labels[organ]
            oracle = grow_box(mask_crop_box(mask), margin_voxels(MARGIN_MM, ct.spacing), ct.shape)
            row = {"organ": organ, "case": test, "oracle": np.prod(ct.shape) / np.prod(box_shape(oracle))}
            if organ in boxes:
                box = crop_box(np.asarray(boxes[organ]["crop_box_voxels"]), ct.shape)
                row.update({"localizer": np.prod(ct.shape) / np.prod(box_shape(box)), "kept": fraction_inside(mask, box)})
            rows.append(row)
    print(f"machine: {machine()}")
    print(f"model: {args.model or 'none (perfect-localizer column only)'}; margin {MARGIN_MM} mm\n")
    print("| organ | CT | voxel ratio, label box + 10 mm | voxel ratio, 1-shot localizer crop | organ kept by that crop |")
    print("|---|---|---|---|---|")
    for r in rows:
        loc = f"{r['localizer']:.1f}x | {r['kept']:.3f}" if "localizer" in r else "- | -"
        print(f"| {r['organ']} | {r['case']} | {r['oracle']:.1f}x | {loc} |")


if __name__ == "__main__":
    main()
