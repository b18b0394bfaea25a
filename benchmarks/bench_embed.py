"""Benchmark: time and peak memory of `embed`, and pretraining iterations per second, on CPU and CUDA.

Cases: patient C of ../shared/data (233x167x191 at 1.5 mm) and a 512x512x300 volume (patient C resampled to
0.8x0.8x1.5 mm and padded with air, so the content is real anatomy). Each measurement runs in its own process so
that its peak memory is its own. Prints the machine and a Markdown table; also writes it as JSON.

    python benchmarks/bench_embed.py [--model base] [--out benchmarks/results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NNUNET_APE_TEST_DATA", REPO.parent / "shared" / "data" / "ct"))
PATIENT_C = DATA / "ts_c_chest_cta_ct.nii.gz"
PATIENTS = [DATA / n for n in ("ts_a_abdomen_pelvis_ct.nii.gz", "ts_b_upper_abdomen_ct.nii.gz", "ts_c_chest_cta_ct.nii.gz",
                               "radiomics_lung1_ct.nrrd", "radiomics_lung2_ct.nrrd")]


def machine() -> str:
    """One line describing CPU, cores, memory, torch and GPU."""
    import torch

    cpu = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU"
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, torch {torch.__version__}, {gpu}"


def large_volume(path: Path) -> None:
    """Write patient C resampled onto a 512x512x300 grid at 0.8x0.8x1.5 mm (air outside the scan)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(PATIENT_C))
    size, spacing = (512, 512, 300), (0.8, 0.8, 1.5)
    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()])
    origin = [c - (n - 1) * s / 2 for c, n, s in zip(centre, size, spacing)]
    out = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, origin, spacing, image.GetDirection(), -1000,
                        sitk.sitkInt16)
    sitk.WriteImage(out, str(path))


def _peak_host_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def measure_embed(image: str, device: str, model_preset: str, repeats: int) -> dict:
    """Embed ``image`` ``repeats`` times after one warm-up; seconds (median) and peak memory."""
    import torch

    from nnunet_ape.embed import EmbedSettings, embed_volume
    from nnunet_ape.io import read_volume
    from nnunet_ape.models.ape import PRESETS, APENet

    volume = read_volume(image)
    model = APENet(PRESETS[model_preset]).eval()
    settings = EmbedSettings()
    embed_volume(model, volume, settings, device=device, progress=False)  # warm-up (allocator, cuDNN autotune)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        embed_volume(model, volume, settings, device=device, progress=False)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    result = {"seconds": sorted(times)[len(times) // 2], "peak_host_gib": _peak_host_gib(), "shape": list(volume.shape)}
    if device == "cuda":
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def measure_pretrain(device: str, model_preset: str, iterations: int) -> dict:
    """Iterations per second of the real pretraining loop (paper batch: n=8 pairs, N=8000, 96x96x64 views)."""
    from nnunet_ape.pretrain.batches import BatchConfig
    from nnunet_ape.pretrain.train_ape import PretrainConfig, pretrain_ape

    with tempfile.TemporaryDirectory() as tmp:
        cfg = PretrainConfig(iterations=iterations, model=model_preset, batch=BatchConfig(variant="equiv"), device=device,
                             workers=min(8, os.cpu_count() or 1), checkpoint_every=10**9)
        pretrain_ape([p for p in PATIENTS if p.exists()], Path(tmp) / "run", cfg)
        with open(Path(tmp) / "run" / "log.csv") as f:
            seconds = [float(line.split(",")[-1]) for line in f.read().splitlines()[1:]]
    warm = 2  # the first iterations include worker start-up
    rate = (len(seconds) - warm) / (seconds[-1] - seconds[warm - 1])
    return {"iterations_per_second": rate, "peak_host_gib": _peak_host_gib()}


def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base", help="APE preset to time (tiny, small, base)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pretrain-iterations", type=int, default=0, help="0: 12 on CUDA, 4 on CPU")
    parser.add_argument("--devices", default="", help="comma list; default cpu plus cuda when available")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = measure_embed(rest[0], rest[1], rest[2], int(rest[3])) if kind == "embed" else measure_pretrain(rest[0], rest[1], int(rest[2]))
        print(json.dumps(result))
        return

    import torch

    if not PATIENT_C.exists():
        sys.exit(f"patient C not found at {PATIENT_C}; set NNUNET_APE_TEST_DATA")
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"machine: {machine()}")
    print(f"model: APE '{args.model}' (random weights; speed does not depend on them)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "ct_512x512x300.nii.gz"
        large_volume(big)
        for device in devices:
            for name, path in [("patient C 233x167x191", PATIENT_C), ("512x512x300", big)]:
                r = run_child(["embed", str(path), device, args.model, str(args.repeats)])
                rows.append({"job": f"embed {name}", "device": device, **r})
                print(rows[-1], flush=True)
            its = args.pretrain_iterations or (12 if device == "cuda" else 4)
            r = run_child(["pretrain", device, args.model, str(its)])
            rows.append({"job": "pretrain (n=8, N=8000)", "device": device, **r})
            print(rows[-1], flush=True)
    print("\n| job | device | time | peak host RAM (main process) | peak GPU memory |\n|---|---|---|---|---|")
    for r in rows:
        speed = f"{r['seconds']:.2f} s" if "seconds" in r else f"{r['iterations_per_second']:.2f} it/s"
        gpu = f"{r['peak_gpu_gib']:.2f} GiB" if "peak_gpu_gib" in r else "-"
        print(f"| {r['job']} | {r['device']} | {speed} | {r['peak_host_gib']:.2f} GiB | {gpu} |")
    if args.out:
        args.out.write_text(json.dumps({"machine": machine(), "model": args.model, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
