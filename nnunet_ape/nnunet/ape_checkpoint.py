"""An APE model from an ``nnUNetTrainerAPEPretrain`` checkpoint, for ``embed`` and ``localize``
(:func:`nnunet_ape.checkpoint.load_ape_model` hands such checkpoints here through the reader that
:mod:`nnunet_ape.nnunet.checkpoint_reader` registers).

The network is the plans' own, rebuilt from the checkpoint's ``init_args``. It was trained on nnU-Net's
preprocessed arrays: intensities normalized by the plans' scheme, axes as the training cases were stored (after the
plans' ``transpose_forward``). :class:`NNUNetAPE` takes our canonical (LPS) volumes instead: it normalizes HU as
nnU-Net did, permutes and flips the canonical axes into the training cases' array axes, and returns the map in
canonical axes again, its channels reordered (and negated where an axis runs against LPS) so that channel c follows
patient axis c like the maps of our own APE network.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunet_ape.errors import InputError
from nnunet_ape.nnunet.pretrain_trainer import EMBED_DIM, NNUNET_APE_FORMAT

SUPPORTED_NORMALIZATION = ("CTNormalization", "ZScoreNormalization")


class NNUNetAPE(nn.Module):
    """The plans' network as an APE model on canonical volumes (module docstring).

    network: the nnU-Net network (3 outputs); patient_axes: per array axis ``(LPS axis, flipped)``; output_mean,
    output_var: the output norm's statistics; normalization: the scheme name and, for CT, the plans' foreground
    intensity properties; divisor: per array axis, the input size multiple the network needs.
    """

    def __init__(self, network: nn.Module, patient_axes: list[tuple[int, bool]], output_mean: torch.Tensor,
                 output_var: torch.Tensor, normalization: tuple[str, dict], divisor: list[int]) -> None:
        super().__init__()
        self.network = network
        self.patient_axes = [(int(a), bool(f)) for a, f in patient_axes]
        self.register_buffer("output_mean", output_mean.float().view(1, -1, 1, 1, 1))
        self.register_buffer("output_std", (output_var.float() + 1e-5).sqrt().view(1, -1, 1, 1, 1))
        self.normalization = normalization
        self.divisor = list(divisor)

    def input_from_hu(self, hu: torch.Tensor | np.ndarray) -> torch.Tensor:
        """HU ``(X, Y, Z)`` -> network input as nnU-Net's preprocessing normalizes it (float32)."""
        x = torch.as_tensor(np.asarray(hu) if not isinstance(hu, torch.Tensor) else hu).float()
        scheme, properties = self.normalization
        if scheme == "CTNormalization":
            x = x.clamp(properties["percentile_00_5"], properties["percentile_99_5"])
            return (x - properties["mean"]) / max(properties["std"], 1e-8)
        return (x - x.mean()) / x.std().clamp_min(1e-8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, X, Y, Z)`` canonical (LPS) input -> ``(B, 3, X, Y, Z)`` embedding, channel c along LPS axis c."""
        order = [axis for axis, _ in self.patient_axes]
        flips = [2 + a for a, (_, flipped) in enumerate(self.patient_axes) if flipped]
        x = x.permute(0, 1, *(2 + c for c in order))
        if flips:
            x = x.flip(flips)
        size = x.shape[2:]
        pad = [(-s) % d for s, d in zip(size, self.divisor)]
        if any(pad):
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), value=0.0)  # nnU-Net's padding value after normalization
        out = self.network(x)[:, :, : size[0], : size[1], : size[2]]
        out = (out.float() - self.output_mean) / self.output_std
        signs = torch.tensor([-1.0 if flipped else 1.0 for _, flipped in self.patient_axes], device=out.device)
        out = out * signs.view(1, -1, 1, 1, 1)
        if flips:
            out = out.flip(flips)
        inverse = [order.index(c) for c in range(3)]
        out = out.permute(0, 1, *(2 + a for a in inverse))  # spatial axes back to canonical
        return out[:, inverse]  # channel c = the array axis that runs along patient axis c


def ape_model_from_nnunet(state: dict, path: str) -> tuple[NNUNetAPE, dict]:
    """An ``nnUNetTrainerAPEPretrain`` checkpoint dict -> (:class:`NNUNetAPE` in eval mode on CPU, state with the
    ``embed`` settings in canonical axes: the configuration's spacing and patch size). InputError for an nnU-Net
    segmentation checkpoint or one this function cannot use."""
    extra = state.get("nnunet_ape", {})
    if extra.get("format") != NNUNET_APE_FORMAT:
        raise InputError(f"{path}: an nnU-Net segmentation checkpoint ({state.get('trainer_name')}), not an APE model; "
                         f"give the checkpoint of an nnUNetTrainerAPEPretrain run")
    args = state["init_args"]
    plans = PlansManager(args["plans"])
    configuration = plans.get_configuration(args["configuration"])
    channels = len(args["dataset_json"]["channel_names"])
    if channels != 1:
        raise InputError(f"{path}: pretrained on {channels} input channels; embed reads one CT per case")
    scheme = configuration.normalization_schemes[0]
    if scheme not in SUPPORTED_NORMALIZATION:
        raise InputError(f"{path}: the plans normalize with {scheme}; embed supports {', '.join(SUPPORTED_NORMALIZATION)}")
    network = get_network_from_plans(configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                                     configuration.network_arch_init_kwargs_req_import, channels, EMBED_DIM,
                                     allow_init=True, deep_supervision=False)
    network.load_state_dict(state["network_weights"])
    axes = extra.get("patient_axes") or [(2, False), (1, False), (0, False)]  # SimpleITK order of an LPS image
    strides = np.asarray(configuration.network_arch_init_kwargs.get("strides", [[1, 1, 1]]))
    divisor = [int(d) for d in np.prod(strides, axis=0)]
    model = NNUNetAPE(network, axes, extra["output_mean"], extra["output_var"],
                      (scheme, plans.foreground_intensity_properties_per_channel.get("0", {})), divisor)
    spacing, patch = [0.0] * 3, [0] * 3
    for array_axis, (patient, _) in enumerate(model.patient_axes):
        spacing[patient] = float(configuration.spacing[array_axis])
        patch[patient] = int(configuration.patch_size[array_axis])
    summary = {"format": NNUNET_APE_FORMAT, "embed": {"spacing": spacing, "patch_size": patch},
               "trainer_name": state.get("trainer_name"), "configuration": args["configuration"]}
    return model.eval(), summary
