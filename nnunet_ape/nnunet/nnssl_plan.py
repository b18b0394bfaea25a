"""nnssl's adaptation plan for our nnU-Net checkpoints, so that nnU-Net's nnssl fine-tuning path reads them.

nnssl (MIC-DKFZ/nnssl) writes into every pretraining checkpoint, under ``nnssl_adaptation_plan``, what a downstream
segmentation training needs to rebuild the network and take over its encoder (``AbstractBaseTrainer.save_checkpoint``
with ``AdaptationPlan.serialize()``, ``src/nnssl/adaptation_planning/adaptation_plan.py``), and the same dict as
``adaptation_plan.json``. nnU-Net's fine-tuning path (GitHub main, not the 2.8.1 release:
``nnunetv2/experiment_planning/like_nnssl.py`` and ``PretrainedTrainer.load_pretrained_weights`` in
``nnunetv2/training/nnUNetTrainer/pretraining/pretrainedTrainer.py``) reads that dict from the checkpoint with
``torch.load(weights_only=True)``. The dict, as nnssl serializes it::

    architecture_plans: {arch_class_name, arch_kwargs, arch_kwargs_requiring_import}
    pretrain_plan: nnssl's Plan (dataset_name, plans_name, original_median_spacing_after_transp, image_reader_writer,
                   transpose_forward, transpose_backward, configurations: {name: ConfigurationPlan}, experiment_planner_used)
    pretrain_num_input_channels, recommended_downstream_patchsize,
    key_to_encoder, key_to_stem, keys_to_in_proj, key_to_lpe

The keys locate weights in ``network_weights``: everything whose name starts with ``key_to_encoder`` (the encoder)
or ``key_to_stem`` (the stem, which may lie inside the encoder), and ``keys_to_in_proj`` (module paths; their
``.weight`` is the convolution that reads the input channels). dynamic_network_architectures' networks carry these
keys as attributes; we take them from the network itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunet_ape.atomic import atomic_path

PLAN_JSON = "adaptation_plan.json"
# nnssl's dataclasses (plan.py) take exactly these fields (Plan.from_dict / ConfigurationPlan(**...) refuse others)
PLAN_FIELDS = ("dataset_name", "plans_name", "original_median_spacing_after_transp", "image_reader_writer",
               "transpose_forward", "transpose_backward", "experiment_planner_used")
# nnssl field -> the nnU-Net configuration key it is taken from (masks are resampled like segmentations)
CONFIGURATION_FIELDS = {"data_identifier": "data_identifier", "preprocessor_name": "preprocessor_name",
                        "normalization_schemes": "normalization_schemes", "use_mask_for_norm": "use_mask_for_norm",
                        "resampling_fn_data": "resampling_fn_data", "resampling_fn_data_kwargs": "resampling_fn_data_kwargs",
                        "resampling_fn_mask": "resampling_fn_seg", "resampling_fn_mask_kwargs": "resampling_fn_seg_kwargs",
                        "spacing": "spacing", "patch_size": "patch_size"}
NETWORK_KEYS = ("key_to_encoder", "key_to_stem", "keys_to_in_proj")


def without_numpy(obj):
    """``obj`` with numpy scalars as Python scalars and numpy arrays as tensors, through dicts, lists and tuples
    (as nnssl's ``AbstractBaseTrainer._convert_numpy``), so that ``torch.load(weights_only=True)`` reads it; other
    values are returned as they are."""
    if isinstance(obj, dict):
        return {k: without_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(without_numpy(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    return obj


def _json_plain(obj):
    """``obj`` as JSON would give it back (lists, dicts, str, numbers, bool, None); numpy values as lists/scalars."""
    return json.loads(json.dumps(obj, default=lambda v: v.tolist() if isinstance(v, (np.ndarray, np.generic)) else str(v)))


def pretrain_plan(plans: dict, configuration: str) -> dict:
    """nnssl's ``Plan`` (serialized) of nnU-Net ``plans`` with the one ``configuration`` that was trained, its
    settings renamed to nnssl's ``ConfigurationPlan`` fields. ``spacing_style`` is ``"median"``: nnU-Net's target
    spacing comes from the dataset's spacings (nnssl's other styles are ``onemmiso`` and ``noresample``)."""
    resolved = PlansManager(plans).get_configuration(configuration).configuration
    settings = {field: resolved.get(key) for field, key in CONFIGURATION_FIELDS.items()}
    settings["spacing_style"] = "median"
    out = {field: plans.get(field) for field in PLAN_FIELDS}
    out["configurations"] = {configuration: settings}
    return out


def architecture_plans(plans: dict, configuration: str) -> dict:
    """nnssl's ``ArchitecturePlans`` (serialized) of the configuration's network: class name, kwargs, the kwargs to
    import (those set, as nnssl's ``get_kwargs_requiring_import`` lists them; nnU-Net skips None ones anyway).
    dynamic_network_architectures' classes get their bare name, as nnssl writes them (``ResidualEncoderUNet``,
    ``PlainConvUNet``: nnssl checks those names; nnU-Net finds them in that package); other classes keep their path."""
    manager = PlansManager(plans).get_configuration(configuration)
    name = manager.network_arch_class_name
    if name.startswith("dynamic_network_architectures."):
        name = name.rsplit(".", 1)[-1]
    kwargs = manager.network_arch_init_kwargs
    imported = [k for k in manager.network_arch_init_kwargs_req_import if kwargs.get(k) is not None]  # nnssl lists no None
    return {"arch_class_name": name, "arch_kwargs": kwargs, "arch_kwargs_requiring_import": imported}


def network_keys(network: nn.Module) -> dict | None:
    """``{key_to_encoder, key_to_stem, keys_to_in_proj}`` of a dynamic_network_architectures network (attributes it
    carries, e.g. PlainConvUNet: ``encoder.stages``, ``encoder.stages.0``, its first convolution); None for a network
    without them."""
    if not all(hasattr(network, key) for key in NETWORK_KEYS):
        return None
    return {"key_to_encoder": str(network.key_to_encoder), "key_to_stem": str(network.key_to_stem),
            "keys_to_in_proj": [str(k) for k in network.keys_to_in_proj]}


def adaptation_plan(plans: dict, configuration: str, num_input_channels: int, network: nn.Module) -> dict | None:
    """nnssl's ``nnssl_adaptation_plan`` (module docstring) for a network trained with ``plans``' ``configuration``
    on ``num_input_channels`` input channels: plain JSON types only. The recommended downstream patch size is the
    configuration's patch size; ``key_to_lpe`` is None (no learned positional embedding in these CNNs). None when the
    network does not name its encoder (not a dynamic_network_architectures network)."""
    keys = network_keys(network)
    if keys is None:
        return None
    plan = {"architecture_plans": architecture_plans(plans, configuration),
            "pretrain_plan": pretrain_plan(plans, configuration),
            "pretrain_num_input_channels": int(num_input_channels),
            "recommended_downstream_patchsize": PlansManager(plans).get_configuration(configuration).patch_size,
            **keys, "key_to_lpe": None}
    return _json_plain(plan)


def write_plan_json(plan: dict, folder: str | Path) -> Path:
    """``plan`` as ``folder/adaptation_plan.json`` (written atomically); returns the path."""
    path = Path(folder) / PLAN_JSON
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(plan, indent=2))
    return path
