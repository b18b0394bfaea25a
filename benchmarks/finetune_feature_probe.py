"""Do the APE-pretrained encoder's features say more about the organs than random filters' do? A linear probe for
the few-label benchmark (issue 31): per encoder stage of its network, a softmax regression from the stage's
features (trilinearly upsampled to the patch grid) to the labels, fitted on patches of the 5 labeled training cases
of run ``k5_s0`` and scored on patches of its 8 learning-curve cases (training split: no test case), for the
pretrained encoder, nnU-Net's initialisation (random filters, the scratch start) and any ``--checkpoints``; the CT
intensity alone as the floor. If the pretrained features separate the organs no better than random ones, the
pretraining has little to give a fine-tuning however its gradients are scaled (``finetune_start_probe``).

    python benchmarks/finetune_feature_probe.py --work WORK [--checkpoints CKPT ...] [--patches 10]

WORK: a ``bench_pretrain_finetune.py --cohort headneck`` work folder whose pretraining has finished. Patches: the
plans' patch size around a random organ voxel (``finetune_start_probe.patches``, seed 0). Prints Dice per organ of
the probe's prediction on every voxel of the scoring patches (pooled over patches), per stage and start, and the
machine; writes nothing. CPU, a few minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import machine  # noqa: E402
from finetune_start_probe import (add_work_arguments, checkpoint_starts, fresh_network, load_weights,  # noqa: E402
                                  patches, work_inputs)

FIT_VOXELS = 2000  # per label and fitting patch at most: small organs are over-represented, fit_probe's prior undoes it


def stage_features(network: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The encoder's stage outputs for one patch ``x`` (1, C, *patch): a list of (F_s, *stage grid) tensors, stage 0
    (full resolution) first."""
    with torch.no_grad():
        return [s[0] for s in network.encoder(x)]


def on_patch_grid(stages: list[torch.Tensor], size: tuple[int, ...]) -> torch.Tensor:
    """``stages`` ((F_s, *grid_s) each) trilinearly upsampled to ``size`` and stacked: (sum F_s, *size)."""
    return torch.cat([torch.nn.functional.interpolate(s[None], size=size, mode="trilinear", align_corners=False)[0]
                      for s in stages])


def fitting_sample(features: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to :data:`FIT_VOXELS` random voxels of each label of one patch: features (N, F) and labels (N,) from
    ``features`` (F, *patch) and ``labels`` (*patch, integer)."""
    flat, flat_labels = features.flatten(1).T, labels.flatten().long()
    keep = []
    for label in flat_labels.unique():
        where = torch.nonzero(flat_labels == label).flatten()
        keep.append(where[torch.randperm(len(where), generator=generator)[:FIT_VOXELS]])
    keep = torch.cat(keep)
    return flat[keep], flat_labels[keep]


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, prior: torch.Tensor | None = None,
              l2: float = 1e-4) -> torch.nn.Linear:
    """A softmax regression fitted to features ``x`` (N, F) and labels ``y`` (N,) in [0, classes), features
    standardised on ``x`` (folded into the returned layer), L-BFGS; returns the linear layer (F -> classes). The
    sample over-represents small organs (:func:`fitting_sample`); ``prior`` (classes,), the labels' true
    frequencies, shifts the biases by log(prior / the sample's frequency), so that the argmax does not."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    layer = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(z), y) + l2 * layer.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():  # fold the standardisation in: layer(x) = W (x - mean) / std + b
        layer.bias -= (layer.weight * (mean / std)).sum(1)
        layer.weight /= std
        if prior is not None:
            sampled = torch.bincount(y, minlength=classes).double() / len(y)
            shift = torch.log(prior.double().clamp_min(1e-12)) - torch.log(sampled.clamp_min(1e-12))
            layer.bias += torch.where(sampled > 0, shift, torch.zeros_like(shift)).float()
    return layer


def label_frequencies(labels: list[torch.Tensor], classes: int) -> torch.Tensor:
    """Each label's share of all voxels of ``labels`` ((*patch) each): (classes,)."""
    counts = sum(torch.bincount(y.flatten().long(), minlength=classes) for y in labels)
    return counts.double() / counts.sum()


def probe_dice(layer: torch.nn.Linear, features: Iterable[torch.Tensor], labels: list[torch.Tensor], classes: int) -> list[float]:
    """Dice per foreground label (1..classes-1) of ``layer``'s argmax over every voxel of the scoring patches
    (``features`` (F, *patch) and ``labels`` (*patch) per patch, features made one at a time), pooled over the
    patches; NaN for a label that no patch holds."""
    tp, fp, fn = (np.zeros(classes) for _ in range(3))
    with torch.no_grad():
        for f, y in zip(features, labels):
            predicted = layer(f.flatten(1).T).argmax(1)
            truth = y.flatten().long()
            for c in range(1, classes):
                p, t = predicted == c, truth == c
                tp[c] += int((p & t).sum())
                fp[c] += int((p & ~t).sum())
                fn[c] += int((~p & t).sum())
    present = (tp + fn)[1:] > 0
    dice = 2 * tp[1:] / np.maximum(2 * tp[1:] + fp[1:] + fn[1:], 1)
    return [float(d) if ok else float("nan") for d, ok in zip(dice, present)]


def probe_start(network: torch.nn.Module | None, fit: tuple[torch.Tensor, torch.Tensor],
                score: tuple[torch.Tensor, torch.Tensor], classes: int) -> dict[str, list[float]]:
    """Dice per organ of a linear probe on each encoder stage of ``network`` and on all stages together (None: the
    CT intensity alone), fitted on the ``fit`` patches and scored on the ``score`` patches ((n, 1, *patch) data
    and labels each); keys ``stage 0`` ... and ``all stages`` (or ``intensity``)."""
    generator = torch.Generator().manual_seed(0)
    prior = label_frequencies([y[0] for y in fit[1]], classes)

    def per_patch(x: torch.Tensor) -> list[list[torch.Tensor]]:
        if network is None:
            return [[p] for p in x]
        return [stage_features(network, p[None]) for p in x]

    fit_features, score_features = per_patch(fit[0]), per_patch(score[0])
    size = tuple(fit[0].shape[2:])
    stages = len(fit_features[0])
    views = {"intensity": [0]} if network is None else {**{f"stage {s}": [s] for s in range(stages)},
                                                        "all stages": list(range(stages))}
    results = {}
    for name, chosen in views.items():
        def pick(fs: list[torch.Tensor], c: list[int] = chosen) -> torch.Tensor:
            return on_patch_grid([fs[s] for s in c], size)

        samples = [fitting_sample(pick(fs), y[0], generator) for fs, y in zip(fit_features, fit[1])]
        layer = fit_probe(torch.cat([s[0] for s in samples]), torch.cat([s[1] for s in samples]), classes, prior)
        results[name] = probe_dice(layer, (pick(fs) for fs in score_features), [y[0] for y in score[1]], classes)
    return results


def main(argv: list[str] | None = None) -> None:
    """Print the probe's tables (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_work_arguments(p)
    p.add_argument("--patches", type=int, default=10, help="patches to fit on (2 per labeled case) and to score on [10]")
    args = p.parse_args(argv)
    preprocessed, pretrained, run, config = work_inputs(args.work, args.checkpoints)
    organs = [name for name, v in json.loads((preprocessed / "dataset.json").read_text())["labels"].items() if v != 0]
    data = preprocessed / config.data_identifier
    fit = patches(data, run["train"], list(config.patch_size), args.patches)
    score = patches(data, run["val"], list(config.patch_size), args.patches)

    starts = {"CT intensity": None, "random (scratch start)": fresh_network(config),
              "APE-pretrained": load_weights(fresh_network(config), pretrained), **checkpoint_starts(config, args.checkpoints)}
    for network in starts.values():
        if network is not None:
            network.eval()
    results = {name: probe_start(net, fit, score, len(organs) + 1) for name, net in starts.items()}

    print(f"Linear probe on {args.patches} patches of {list(config.patch_size)} from {', '.join(run['train'])} (fit) and "
          f"{args.patches} from {', '.join(run['val'])} (score); {args.work}; machine: {machine()}")
    rows = sorted({view for r in results.values() for view in r if view != "intensity"}, key=lambda v: (v == "all stages", v))
    print(f"\nmean Dice over organs\n{'features':14s}" + "".join(f"{n[:24]:>26s}" for n in starts))
    for view in rows:
        print(f"{view:14s}" + "".join(f"{np.nanmean(r.get(view, r.get('intensity'))):26.3f}" for r in results.values()))
    print(f"\nDice per organ, all stages (CT intensity: itself)\n{'organ':14s}" + "".join(f"{n[:24]:>26s}" for n in starts))
    for i, organ in enumerate(organs):
        print(f"{organ:14s}" + "".join(f"{r.get('all stages', r.get('intensity'))[i]:26.3f}" for r in results.values()))


if __name__ == "__main__":
    main()
