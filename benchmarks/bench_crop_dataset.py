"""Benchmark: seconds and peak memory per case of `nnunet-ape crop-dataset` on 512x512x300 CT, embedding included.

The source dataset (written to a temporary nnUNet_raw) holds patient A of ../shared/data and its labels resampled
onto a 512x512x300 grid (0.75x0.75x1.15 mm, real anatomy; training case) and patient C on the same grid (test
case). The APE model is the `base` preset with random weights (speed does not depend on the weights), its
localizer fitted on the 512^3-class case for liver and spleen. In the same run, as the reference, `nnunet-ape
embed` of the same two CTs: crop-dataset's own cost is what it adds to the embedding. Each command runs in its own
process; peak memory is that process's maximum resident set. Prints the machine and a Markdown table.

    python benchmarks/bench_crop_dataset.py [--model base] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import DATA, PATIENT_C, machine  # noqa: E402

PATIENT_A = DATA / "ts_a_abdomen_pelvis_ct.nii.gz"
SEG_A = DATA / "ts_a_abdomen_pelvis_seg.nii.gz"
SIZE, SPACING = (512, 512, 300), (0.75, 0.75, 1.15)


def resampled(path: Path, out: Path, label: bool = False) -> None:
    """``path`` resampled onto the benchmark grid about its centre (air / background outside the scan)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()])
    direction = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    origin = [c - (n - 1) * s / 2 for c, n, s in zip(centre, SIZE, SPACING)]
    kind, fill, pixel = (sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8) if label else (sitk.sitkLinear, -1024, sitk.sitkInt16)
    sitk.WriteImage(sitk.Resample(image, SIZE, sitk.Transform(), kind, origin, SPACING, direction, fill, pixel), str(out))


def write_source(raw: Path) -> Path:
    source = raw / "Dataset501_Bench"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (source / sub).mkdir(parents=True)
    resampled(PATIENT_A, source / "imagesTr" / "A_0000.nii.gz")
    resampled(SEG_A, source / "labelsTr" / "A.nii.gz", label=True)
    resampled(PATIENT_C, source / "imagesTs" / "C_0000.nii.gz")
    names = {v: int(k) for k, v in json.loads((DATA / "ts_a_labels.json").read_text()).items()}
    labels = {"background": 0, **{k: v for k, v in sorted(names.items(), key=lambda kv: kv[1])}}
    (source / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1,
                                                     "file_ending": ".nii.gz"}))
    return source


def random_checkpoint(path: Path, preset: str) -> None:
    from nnunet_ape.checkpoint import APE_FORMAT, save_atomic
    from nnunet_ape.models.ape import PRESETS, APENet

    model = APENet(PRESETS[preset]).eval()
    save_atomic({"format": APE_FORMAT, "model_config": model.config.to_dict(), "model": model.state_dict()}, path)


_WRAPPER = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def timed(command: list[str], env: dict) -> tuple[float, float]:
    """Run a command in a fresh wrapper process; (wall seconds, peak resident GiB of its largest process)."""
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _WRAPPER, *command], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n{done.stderr[-3000:]}")
    return seconds, int(done.stderr.strip().splitlines()[-1]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    bindir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = tmp / "raw"
        env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(tmp / "pre"), "nnUNet_results": str(tmp / "res")}
        source = write_source(raw)
        checkpoint = tmp / "ape.pt"
        random_checkpoint(checkpoint, args.model)
        localizer = tmp / "loc.json"
        subprocess.run([str(bindir / "nnunet-ape"), "localize", "fit", "-m", str(checkpoint), "-d", str(source), "--organs", "liver",
                        "spleen", "--shots", "1", "-o", str(localizer), "--device", args.device], env=env, check=True, capture_output=True)
        rows = []
        embed_s, embed_mem = timed([str(bindir / "nnunet-ape"), "embed", "-m", str(checkpoint), "-i", str(source), "-o", str(tmp / "maps"),
                                    "--device", args.device], env)
        rows.append(("embed (reference: the APE pass alone)", embed_s / 2, embed_mem))
        for channels in ([], ["--channels", "ape"]):
            dataset_id = "601" if not channels else "602"
            seconds, mem = timed([str(bindir / "nnunet-ape"), "crop-dataset", "-d", "501", "-l", str(localizer), "-o", dataset_id,
                                  "--device", args.device, *channels], env)
            rows.append((f"crop-dataset{' --channels ape' if channels else ''}", seconds / 2, mem))
        crops = json.loads(next(raw.glob("Dataset601_*")).joinpath("crops.json").read_text())
    print(f"machine: {machine()}")
    print(f"model: {args.model} (random weights), device {args.device}, 2 cases of {SIZE[0]}x{SIZE[1]}x{SIZE[2]} (1 training, 1 test)\n")
    print("| job | seconds per case (process start included) | ratio to embed | peak RSS (GiB) |")
    print("|---|---|---|---|")
    for name, seconds, mem in rows:
        print(f"| {name} | {seconds:.1f} | {seconds / rows[0][1]:.2f} | {mem:.2f} |")
    ratios = ", ".join(f"{c['case']} {c['voxel_ratio']:.1f}x" for c in crops["cases"])
    print(f"\nvoxel ratio source/crop per case: {ratios}")


if __name__ == "__main__":
    main()
