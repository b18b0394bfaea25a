"""Small nnU-Net plans for CPU runs: a planned configuration with fewer, narrower stages and a capped patch.

nnU-Net plans its network for a GPU (32-320 features, up to 6 stages, patches of 128^3 voxels and more); on a CPU
one such iteration takes seconds. :func:`shrink_configuration` keeps everything nnU-Net planned from the data
(spacing, normalization, kernel sizes and strides of the first stages, the patch's proportions where it fits)
and shrinks the network and patch, the same way for every model it is applied to, so their comparison stays fair.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SMALL_FEATURES = (8, 16, 32, 64)


def _multiple_below(n: int, step: int) -> int:
    """The largest multiple of ``step`` that is <= ``n`` (at least ``step``)."""
    return max(step, (n // step) * step)


def shrink_configuration(config: dict, features: tuple[int, ...] = SMALL_FEATURES, max_patch: int = 64) -> dict:
    """A copy of a planned configuration (``plans["configurations"][name]``, with its ``architecture``) with at
    most ``len(features)`` stages of ``features`` widths, one convolution per stage, and the patch capped at
    ``max_patch`` voxels per axis (each axis a multiple of the network's total stride along it)."""
    out = json.loads(json.dumps(config))
    arch = out["architecture"]["arch_kwargs"]
    n = min(int(arch["n_stages"]), len(features))
    strides = arch["strides"][:n]
    total = np.prod(np.asarray(strides), axis=0)
    arch.update({"n_stages": n, "features_per_stage": list(features[:n]), "kernel_sizes": arch["kernel_sizes"][:n],
                 "strides": strides, "n_conv_per_stage": [1] * n, "n_conv_per_stage_decoder": [1] * (n - 1)})
    out["patch_size"] = [_multiple_below(min(int(p), max_patch), int(s)) for p, s in zip(config["patch_size"], total)]
    return out


def shrink_plans(plans_file: Path, configuration: str = "3d_fullres", **kwargs) -> dict:
    """Rewrite ``plans_file`` (nnU-Net's plans JSON) with ``configuration`` shrunk by :func:`shrink_configuration`
    (``kwargs`` are its options); returns the new configuration."""
    plans = json.loads(Path(plans_file).read_text())
    if configuration not in plans["configurations"]:
        raise KeyError(f"{plans_file} has no configuration {configuration!r}")
    plans["configurations"][configuration] = shrink_configuration(plans["configurations"][configuration], **kwargs)
    Path(plans_file).write_text(json.dumps(plans, indent=1))
    return plans["configurations"][configuration]
