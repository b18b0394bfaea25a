"""How much a pretraining grew an nnU-Net network's weights, per convolution that a norm follows: the weight norm
in the checkpoint over the norm nnU-Net's initialisation gives it, and the factor by which SGD's relative steps on
that weight shrink (the square of the growth: a norm after the convolution makes its scale irrelevant to the
function, so the relative step is about lr / |w|^2). This is what the few-label benchmark's ``ape_rescaled`` start
undoes (``headneck_finetune.rescale_to_init_norms``).

    python benchmarks/weight_growth.py CHECKPOINT.pth PLANS.json [--configuration 3d_fullres]

CHECKPOINT: an nnU-Net checkpoint (``network_weights``), e.g. ``nnUNetTrainerAPEPretrain``'s
``checkpoint_final.pth``; PLANS: the plans the network was built from (the ``plans.json`` beside it). Prints one
line per convolution and the machine; reads and writes nothing else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import machine  # noqa: E402
from headneck_finetune import rescale_to_init_norms  # noqa: E402


def growth(checkpoint: Path, plans: Path, configuration: str) -> list[tuple[str, float]]:
    """``[(module name, weight norm / nnU-Net's initial norm)]`` for every convolution that a norm follows in the
    network of ``plans`` / ``configuration`` carrying the weights of ``checkpoint`` (those of matching name and
    shape; the segmentation heads of a pretraining are left out that way)."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    config = PlansManager(str(plans)).get_configuration(configuration)
    weights = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    weights = {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in weights.items()}
    network = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                     config.network_arch_init_kwargs_req_import, 1, 2, allow_init=True,
                                     deep_supervision=True)
    state = network.state_dict()
    state.update({k: v for k, v in weights.items() if k in state and v.shape == state[k].shape})
    network.load_state_dict(state)
    names = [name for name, m in network.named_modules()
             if getattr(m, "conv", None) is not None and getattr(m, "norm", None) is not None]
    return [(name, 1.0 / factor) for name, factor in zip(names, rescale_to_init_norms(network))]


def main(argv: list[str] | None = None) -> None:
    """Print the growth table of a checkpoint (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="nnU-Net checkpoint (.pth) with network_weights")
    p.add_argument("plans", type=Path, help="the plans.json the network was built from")
    p.add_argument("--configuration", default="3d_fullres", help="[3d_fullres]")
    args = p.parse_args(argv)
    for path in (args.checkpoint, args.plans):
        if not path.is_file():
            raise SystemExit(f"{path} does not exist: give an nnU-Net checkpoint and the plans.json beside it")
    print(f"weight growth of {args.checkpoint} over nnU-Net's initialisation; machine: {machine()}")
    print(f"{'convolution (a norm follows)':42s} {'growth':>7s} {'SGD step shrink':>16s}")
    for name, g in growth(args.checkpoint, args.plans, args.configuration):
        print(f"{name:42s} {g:7.2f} {g * g:16.2f}")


if __name__ == "__main__":
    main()
