"""Benchmark: BPR trunks compared in one run. Each trunk is pretrained for the same number of iterations on the
real patients A-E of ../shared/data, then measured with ``evaluate bpr`` on patient A, A with another field of view
and A resampled to 2 mm (landmark-slice MAE, leave one case out), on the monotonicity of its scores on C, D and E,
and on the time to score every slice of a 512x512x300 CT.

    python benchmarks/bench_bpr.py [--trunks tiny resnet efficientnet] [--iterations 300] [--device cuda]

Prints the machine and the tables; writes them and the runs under --out.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_embed import DATA, large_volume, machine


def score_time(model, device: str) -> float:
    """Seconds to score every axial slice of a 512x512x300 CT (after a warm-up)."""
    import torch

    from nnunet_ape.bpr.scoring import raw_slice_scores
    from nnunet_ape.io import read_volume, to_canonical

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ct.nii.gz"
        large_volume(path)
        canon, _ = to_canonical(read_volume(path))
    raw_slice_scores(model, canon, device)
    t0 = time.perf_counter()
    raw_slice_scores(model, canon, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trunks", nargs="+", default=["tiny", "resnet", "efficientnet", "convnext", "densenet", "vgg16"])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--augment", default="none", choices=("none", "light", "bpreg"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench_bpr_out"))
    args = parser.parse_args()

    from nnunet_ape.bpr.evaluate import evaluate_models, markdown_report
    from nnunet_ape.bpr.scoring import load_bpr_model
    from nnunet_ape.bpr.train_bpr import BPRConfig, pretrain_bpr
    from nnunet_ape.case_variants import write_case_variants
    from nnunet_ape.cases import LabeledCase, cases_from_folders, read_label_names

    print(machine())
    patients = [DATA / n for n in ("ts_a_abdomen_pelvis_ct.nii.gz", "ts_b_upper_abdomen_ct.nii.gz", "ts_c_chest_cta_ct.nii.gz",
                                   "radiomics_lung1_ct.nrrd", "radiomics_lung2_ct.nrrd")]
    names = read_label_names(DATA / "ts_a_labels.json")
    a = LabeledCase("A", DATA / "ts_a_abdomen_pelvis_ct.nii.gz", DATA / "ts_a_abdomen_pelvis_seg.nii.gz", names)
    images, labels = write_case_variants(a, args.out / "a_variants")
    cases = cases_from_folders(images, labels, names)

    checkpoints, rows = [], []
    for trunk in args.trunks:
        cfg = BPRConfig(iterations=args.iterations, lr=args.lr, lr_schedule="cosine", trunk=trunk, device=args.device,
                        workers=2, checkpoint_every=max(args.iterations, 1), augment=args.augment)
        t0 = time.perf_counter()
        final = pretrain_bpr(patients, args.out / f"run_{trunk}", cfg, resume=(args.out / f"run_{trunk}" / "checkpoint_final.pt").exists())
        train_s = time.perf_counter() - t0
        checkpoints.append(final)
        model, _ = load_bpr_model(final)
        seconds = score_time(model, args.device)
        rows.append((trunk, sum(p.numel() for p in model.parameters()), train_s, seconds, spearman_unlabeled(model, patients[2:], args.device)))
    result = evaluate_models(checkpoints, cases, [*_landmarks()], args.device)
    report = markdown_report(result)
    lines = [f"# BPR trunks: {args.iterations} iterations each, lr {args.lr} cosine, augment {args.augment}, device {args.device}",
             "", machine(), "", "| trunk | parameters | pretraining (s) | score 512x512x300 (s) | Spearman on C, D, E |",
             "|---|---|---|---|---|"]
    lines += [f"| {t} | {n / 1e6:.2f} M | {tr:.0f} | {s:.2f} | {m:.3f} |" for t, n, tr, s, m in rows]
    text = "\n".join(lines) + "\n\n" + report
    (args.out / "bench_bpr.md").write_text(text)
    print(text)


def spearman_unlabeled(model, paths: list[Path], device: str) -> float:
    """Mean Spearman rho of raw slice score against z over the body slices of unlabeled CTs."""
    from nnunet_ape.bpr.calibration import CaseScores
    from nnunet_ape.bpr.evaluate import monotonicity
    from nnunet_ape.bpr.scoring import body_slices, raw_slice_scores
    from nnunet_ape.io import read_volume, to_canonical

    rhos = []
    for path in paths:
        canon, _ = to_canonical(read_volume(path))
        raw = raw_slice_scores(model, canon, device)
        rhos.append(monotonicity(CaseScores(path.name, raw, raw, body_slices(canon), canon.spacing[2], {}))[1])
    return float(np.mean(rhos))


def _landmarks() -> list[str]:
    from nnunet_ape.bpr.landmarks import DEFAULT_EVALUATION_LANDMARKS

    return list(DEFAULT_EVALUATION_LANDMARKS)


if __name__ == "__main__":
    main()
