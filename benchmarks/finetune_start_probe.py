"""What SGD sees of each fine-tuning start of the few-label benchmark, before (or during) fine-tuning: per
convolution that a norm follows, the weight norm over nnU-Net's initial norm, the spread of its output on real
patches over a freshly initialised network's, and its relative gradient |g| / |w| over that network's, on the
same batch and loss (nnU-Net's Dice + cross-entropy, full resolution only); see ``finetune_starts`` for why these
three numbers decide how fast a start can learn. A fourth table, the cosine of each convolution's weights with the
pretrained ones, shows how much of the pretraining a checkpoint still holds.

    python benchmarks/finetune_start_probe.py --work WORK [--checkpoints CKPT ...] [--patches 4]

WORK: a ``bench_pretrain_finetune.py --cohort headneck`` work folder whose pretraining has finished (its plans,
preprocessed cases, APE checkpoint and the 5-labeled-case run's training cases are read). Starts: ``scratch``
(nnU-Net's initialisation), ``ape`` (the APE weights as ``-pretrained_weights`` loads them), ``ape_reinit``,
``ape_rescaled`` and ``ape_matched`` (prepared with the trainers' functions, ``ape_matched`` on the probe's own
batch), and each ``--checkpoints`` file as it is (e.g. a run's ``checkpoint_latest.pth``). Patches:
the plans' patch size around a random foreground voxel of the labeled cases (seed 0). Prints four tables and the
machine; writes nothing. CPU, about a minute per start.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_starts as fs  # noqa: E402
from bench_embed import machine  # noqa: E402

DATASET = "Dataset902_HeadNeckSplit"
PLANS = "nnUNetPlansCPU"


def fresh_network(config) -> torch.nn.Module:
    """The plans' network (deep supervision off) with nnU-Net's initialisation (``allow_init``), seed 0."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    torch.manual_seed(0)
    return get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                  config.network_arch_init_kwargs_req_import, 1, 8, allow_init=True,
                                  deep_supervision=False)


def load_weights(network: torch.nn.Module, checkpoint: Path) -> torch.nn.Module:
    """``network`` with the weights of an nnU-Net ``checkpoint`` of matching name and shape (heads of another
    label set stay as they are)."""
    weights = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    weights = {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in weights.items()}
    state = network.state_dict()
    state.update({k: v for k, v in weights.items() if k in state and v.shape == state[k].shape})
    network.load_state_dict(state)
    return network


def patches(preprocessed: Path, cases: list[str], size: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` patches (data (n, 1, *size), labels (n, 1, *size)) of the preprocessed ``cases`` in turn, each
    around a random foreground voxel (seed 0)."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    dataset = nnUNetDatasetBlosc2(str(preprocessed), cases)
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for i in range(n):
        data, seg, _, props = dataset.load_case(cases[i % len(cases)])
        data, seg = np.asarray(data), np.asarray(seg)
        locations = [v for v in props["class_locations"].values() if len(v)]
        voxels = locations[rng.integers(len(locations))]
        centre = voxels[rng.integers(len(voxels))][1:]
        lo = [int(np.clip(c - s // 2, 0, max(d - s, 0))) for c, s, d in zip(centre, size, data.shape[1:])]
        box = (slice(None),) + tuple(slice(a, a + s) for a, s in zip(lo, size))
        xs.append(torch.from_numpy(data[box].astype(np.float32)))
        ys.append(torch.from_numpy(np.maximum(seg[box], 0).astype(np.float32)))
    return torch.stack(xs), torch.stack(ys)


def relative_gradients(network: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_dice: bool) -> list[float]:
    """|dL/dw| / |w| per convolution of :func:`finetune_starts.normed_convs`, for nnU-Net's Dice + CE loss."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    network.train()
    network.zero_grad()
    loss(network(x), y).backward()
    return [float(c.weight.grad.norm() / c.weight.detach().norm()) for _, c in fs.normed_convs(network)]


def weight_cosines(network: torch.nn.Module, pretrained: torch.nn.Module) -> list[float]:
    """Cosine between each convolution's weights (:func:`finetune_starts.normed_convs`, flattened) in ``network`` and
    in ``pretrained``: 1 where fine-tuning kept the pretrained filters' directions (per-channel scaling aside), about
    0 for an unrelated random network."""
    pairs = zip(fs.normed_convs(network), fs.normed_convs(pretrained))
    return [float(torch.nn.functional.cosine_similarity(a.weight.detach().flatten(), b.weight.detach().flatten(), dim=0))
            for (_, a), (_, b) in pairs]


def work_inputs(work: Path, checkpoints: list[Path]) -> tuple[Path, Path, dict, ConfigurationManager]:
    """What a probe reads from a few-label work folder: (the preprocessed dataset folder, the APE pretraining's
    final checkpoint, run ``k5_s0``'s entry of ``finetune/folds.json`` (its ``train`` and ``val`` cases), the
    plans' 3d_fullres configuration); a one-line exit when a file, or one of ``checkpoints``, is missing."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    preprocessed = work / "nnUNet_preprocessed" / DATASET
    pretrained = work / "nnUNet_results" / DATASET / f"nnUNetTrainerFinetunePretrain__{PLANS}__3d_fullres" / "fold_0" / "checkpoint_final.pth"
    folds = work / "finetune" / "folds.json"
    for path in (preprocessed / f"{PLANS}.json", pretrained, folds, *checkpoints):
        if not path.is_file():
            raise SystemExit(f"{path} does not exist: give a few-label work folder whose pretraining has finished "
                             "(bench_pretrain_finetune.py --cohort headneck --work WORK)")
    config = PlansManager(str(preprocessed / f"{PLANS}.json")).get_configuration("3d_fullres")
    return preprocessed, pretrained, json.loads(folds.read_text())["k5_s0"], config


def add_work_arguments(parser: argparse.ArgumentParser) -> None:
    """The probes' ``--work`` (the few-label work folder) and ``--checkpoints`` (more networks to probe)."""
    parser.add_argument("--work", type=Path, required=True, help="the few-label benchmark's work folder")
    parser.add_argument("--checkpoints", type=Path, nargs="*", default=[], help="more nnU-Net checkpoints, probed as they are")


def checkpoint_starts(config, checkpoints: list[Path]) -> dict[str, torch.nn.Module]:
    """The plans' network with each nnU-Net checkpoint's weights, by ``"<file stem>, epoch <N>"``."""
    starts = {}
    for checkpoint in checkpoints:
        epoch = torch.load(checkpoint, map_location="cpu", weights_only=False).get("current_epoch", "?")
        starts[f"{checkpoint.stem}, epoch {epoch}"] = load_weights(fresh_network(config), checkpoint)
    return starts


def main(argv: list[str] | None = None) -> None:
    """Print the four tables (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_work_arguments(p)
    p.add_argument("--patches", type=int, default=4, help="patches in the probe batch [4]")
    args = p.parse_args(argv)
    preprocessed, pretrained, run, config = work_inputs(args.work, args.checkpoints)
    cases = run["train"]
    x, y = patches(preprocessed / config.data_identifier, cases, list(config.patch_size), args.patches)

    starts = {"scratch": fresh_network(config), "ape": load_weights(fresh_network(config), pretrained)}
    starts["ape_reinit"] = load_weights(fresh_network(config), pretrained)
    fs.reinit_decoder_end(starts["ape_reinit"])
    for name in ("ape_rescaled", "ape_matched"):
        network = load_weights(fresh_network(config), pretrained)
        fs.reinit_decoder_end(network, nnunet_init=True)
        if name == "ape_rescaled":
            fs.rescale_to_init_norms(network)
        else:
            fs.match_output_spread(network, fs.nnunet_initialised_copy(network), x)
        starts[name] = network
    starts.update(checkpoint_starts(config, args.checkpoints))

    convs = [name for name, _ in fs.normed_convs(starts["scratch"])]
    he = fs.output_spread(starts["scratch"], x)
    grads = {name: relative_gradients(net, x, y, config.batch_dice) for name, net in starts.items()}
    print(f"Fine-tuning starts on {len(x)} patches of {list(config.patch_size)} from {', '.join(cases)} "
          f"({args.work}); machine: {machine()}")
    tables = {
        "weight norm / nnU-Net's initial norm": {n: [float(c.weight.detach().norm()) / fs.he_norm(c.weight)
                                                     for _, c in fs.normed_convs(net)] for n, net in starts.items()},
        "output spread / the freshly initialised network's": {
            n: [float(s.mean() / he[k].mean()) for k, s in fs.output_spread(net, x).items()] for n, net in starts.items()},
        "relative gradient |g|/|w| / scratch's": {n: [g / s for g, s in zip(grads[n], grads["scratch"])] for n in starts},
        "cosine with the pretrained weights": {n: weight_cosines(net, starts["ape"]) for n, net in starts.items()},
    }
    for title, values in tables.items():
        print(f"\n{title}\n" + f"{'convolution':32s}" + "".join(f"{n[:22]:>24s}" for n in starts))
        for i, conv in enumerate(convs):
            print(f"{conv:32s}" + "".join(f"{values[n][i]:24.3g}" for n in starts))
    print("\nscratch's relative gradients: " + ", ".join(f"{g:.2e}" for g in grads["scratch"]))


if __name__ == "__main__":
    main()
