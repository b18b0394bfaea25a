"""The README's front-page picture: a held-out head-and-neck CT (hn_169, a test case of ``headneck_split``) with the
organ boxes a localizer fitted on the training cases predicts for it (``nnunet-ape localize predict --png``).

    python benchmarks/figure_front_page.py --localizer LOCALIZER.json [--organs brainstem parotid_left mandible]

The localizer: ``nnunet-ape localize fit`` on the 163 training cases (``bench_headneck_fov.py`` writes one). Writes
``docs/figures/headneck_crop_boxes.png`` and prints the boxes' volume ratios (image / crop).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_embed import machine  # noqa: E402
from headneck_split import HEADNECK  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--localizer", type=Path, required=True, help="localizer JSON fitted on the training cases")
    parser.add_argument("--case", default="hn_169", help="a test case (hn_169..hn_214) [hn_169]")
    parser.add_argument("--organs", nargs="+", default=["brainstem", "parotid_left", "mandible"])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures" / "headneck_crop_boxes.png")
    args = parser.parse_args(argv)
    image = HEADNECK / "imagesTr" / f"{args.case}_0000.nii.gz"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([str(Path(sys.executable).parent / "nnunet-ape"), "localize", "predict", "-l", str(args.localizer),
                        "-i", str(image), "-o", tmp, "--png", "--organs", *args.organs], check=True)
        boxes = json.loads((Path(tmp) / f"{args.case}_boxes.json").read_text())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / f"{args.case}_boxes.png", args.out)
    shape = np.asarray(boxes["shape"])
    print(f"machine: {machine()}\n{args.case}: wrote {args.out}")
    for organ in args.organs:
        box = np.asarray(boxes["organs"][organ]["crop_box_voxels"])
        extent = np.clip(box[1], 0, shape) - np.clip(box[0], 0, shape)
        print(f"  {organ}: crop {[round(float(x)) for x in extent]} voxels, volume ratio {np.prod(shape) / np.prod(extent):.1f}")


if __name__ == "__main__":
    main()
