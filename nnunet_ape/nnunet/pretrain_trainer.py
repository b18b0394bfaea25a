"""``nnUNetTrainerAPEPretrain``: APE pretraining inside nnU-Net, with the plans' own network and nnU-Net's data.

``nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerAPEPretrain`` trains the configuration's network (as planned:
PlainConvUNet, ResEnc, ...) with a 3-channel head and no deep supervision on the paper's APE task: batches of
overlapping view pairs of one preprocessed case (:mod:`nnunet_ape.nnunet.view_pairs`), each voxel's position in mm
along the preprocessed axes, and the losses of ``nnunet-ape pretrain ape`` (the same functions; ``equiv`` variant by
default). Labels are not used. The head's output passes a non-affine batch norm (as the standalone APE network's
last layer, :class:`OutputNorm`), a submodule of the network applied by a forward hook, whose statistics are not in
the network's state dict: its weights stay exactly nnU-Net's architecture, and ``nnUNetv2_train -pretrained_weights
.../checkpoint_final.pth`` loads everything but the segmentation head.

Multi-GPU (``-num_gpus N``, nnU-Net's DDP): the norm is inside the module DDP wraps and computes its statistics
over the whole batch of all processes, so every process keeps the same running statistics; the segmentation layers
that the network computes only with deep supervision are frozen, so DDP finds no parameter without a gradient (it
otherwise fails at the second iteration, nnU-Net issue #2571). 2d configurations are refused (the view-pair loader
is 3-d only), and a batch without points inside its scan is skipped and logged instead of stopping the run.

What the checkpoints add under ``nnunet_ape`` (``nnunet-ape embed -m checkpoint_final.pth`` reads it): the output
norm's statistics, and which patient axis (LPS) and direction each preprocessed array axis runs along in the
training cases. Under ``nnssl_adaptation_plan`` (and as ``adaptation_plan.json`` beside the checkpoint) they hold
what nnssl writes for fine-tuning (:mod:`nnunet_ape.nnunet.nnssl_plan`), and they load with ``torch.load(...,
weights_only=True)``. nnU-Net's logging, ``--c`` and checkpoints work as usual; ``progress.png`` shows the APE
losses, and the end-of-training segmentation validation is skipped (there is nothing to segment).
"""

from __future__ import annotations

import os
from collections import Counter
from os.path import join

import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import autocast, nn

from nnunet_ape.checkpoint import save_atomic
from nnunet_ape.nnunet.channel_augmentation import intensity_on_image_channels
from nnunet_ape.nnunet.nnssl_plan import adaptation_plan, without_numpy, write_plan_json
from nnunet_ape.nnunet.pretrained_weights import unwrapped_network
from nnunet_ape.nnunet.trainers import _called_by_stock_predictor, short_variant
from nnunet_ape.nnunet.view_pairs import ViewPairDataLoader
from nnunet_ape.pretrain.batches import BatchConfig
from nnunet_ape.pretrain.position_channels import has_points_inside, position_channel_loss
from nnunet_ape.training_log import plot_epoch_losses

NNUNET_APE_FORMAT = "nnunet-ape/ape-nnunet-v1"
EMBED_DIM = 3
MAX_SKIPPED_BATCHES = 50  # consecutive batches without points inside their scan before a run gives up


class _SumOverProcesses(torch.autograd.Function):
    """``dist.all_reduce`` (sum) with its gradient: the gradient of a sum over processes is that sum of gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _SumOverProcesses.apply(grad)


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the processes of torch.distributed (with gradient); itself in a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _SumOverProcesses.apply(tensor)
    return tensor


class OutputNorm(nn.Module):
    """Non-affine batch norm of an output ``(B, C, *spatial)`` per channel, in float32: in one process exactly
    ``BatchNorm3d(C, affine=False)`` (batch statistics in training, running ones, momentum 0.1, in eval). Under
    torch.distributed the training statistics are those of the batches of all processes (sums over processes,
    gradients included, as SyncBatchNorm does on GPUs, but on any device and backend), so every process updates its
    running statistics alike. They are buffers outside the state dict (``persistent=False``): the checkpoint keeps
    them under ``nnunet_ape`` and the network's weights stay the plans' architecture."""

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(channels), persistent=False)
        self.register_buffer("running_var", torch.ones(channels), persistent=False)

    @torch.compiler.disable  # runs eagerly inside a compiled network (its collectives are not traced)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        shape = (1, -1) + (1,) * (x.ndim - 2)
        if not self.training:
            return (x - self.running_mean.view(shape)) / (self.running_var.view(shape) + self.eps).sqrt()
        dims = [0] + list(range(2, x.ndim))
        sums = sum_over_processes(torch.cat([x.sum(dims), x.new_tensor([x.numel() // x.shape[1]])]))
        mean, count = sums[:-1] / sums[-1], sums[-1]
        centered = x - mean.view(shape)
        var = sum_over_processes(centered.pow(2).sum(dims)) / count
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1), self.momentum)
        return centered / (var.view(shape) + self.eps).sqrt()


def _normalize_output(network: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the network's output through its ``ape_output_norm``."""
    return network.ape_output_norm(output)


def with_output_norm(network: nn.Module) -> nn.Module:
    """``network`` with an :class:`OutputNorm` of its output, as submodule ``ape_output_norm`` applied by a forward
    hook: nnU-Net's ``.to(device)``, ``torch.compile``, ``train()``/``eval()`` and DDP (which wraps it) all reach it."""
    network.ape_output_norm = OutputNorm(EMBED_DIM)
    network.register_forward_hook(_normalize_output)
    return network


def freeze_unused_heads(network: nn.Module) -> list[str]:
    """Freeze the segmentation layers a network without deep supervision never computes; returns their names.

    dynamic_network_architectures' decoders (PlainConvUNet, ResEnc) hold one 1x1 convolution per stage in
    ``decoder.seg_layers`` but, with ``deep_supervision`` off, use only the last. DDP as nnU-Net wraps it
    (``find_unused_parameters=False``) fails at the second iteration on parameters without gradients (nnU-Net issue
    #2571); frozen parameters are left out by DDP, the optimizer and gradient clipping, and stay in the state dict.
    A network without ``decoder.seg_layers`` is left as it is.
    """
    decoder = getattr(network, "decoder", None)
    heads = getattr(decoder, "seg_layers", None)
    if heads is None or getattr(decoder, "deep_supervision", True):
        return []
    frozen = []
    for index, head in enumerate(list(heads)[:-1]):
        for name, parameter in head.named_parameters():
            parameter.requires_grad_(False)
            frozen.append(f"decoder.seg_layers.{index}.{name}")
    return frozen


def refuse_2d(plans: dict, configuration: str) -> None:
    """SystemExit (one line) when ``configuration`` has 2-d patches: the view-pair loader and the position
    channels are 3-d (nnU-Net's 2d loader takes 2-d slices of 3-d cases, ``patch_size_was_2d``; ours does not)."""
    patch = PlansManager(plans).get_configuration(configuration).patch_size
    if len(patch) != 3:
        raise SystemExit(f"nnunet-ape: APE pretraining needs a 3d configuration; '{configuration}' has {len(patch)}-d "
                         f"patches {list(patch)}; pretrain with 3d_fullres (or 3d_lowres)")


def network_axes(direction: np.ndarray, transpose_forward: list[int]) -> list[tuple[int, bool]]:
    """For each axis of nnU-Net's preprocessed array, ``(patient axis, flipped)``: the LPS axis (0 L, 1 P, 2 S) it
    runs along most and whether it runs against it.

    direction: the image's 3x3 direction matrix (columns: image index axes i, j, k, in LPS, as SimpleITK);
    transpose_forward: the plans' permutation of SimpleITK's array axes (k, j, i).
    """
    direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    out = []
    for array_axis in transpose_forward:
        column = direction[:, 2 - array_axis]  # SimpleITK array axis 0 is image index axis k
        patient = int(np.argmax(np.abs(column)))
        out.append((patient, bool(column[patient] < 0)))
    return out


class nnUNetTrainerAPEPretrain(nnUNetTrainer):
    """APE pretraining with the plans' network (module docstring). Class attributes set the task: ``variant`` and
    ``equiv_weight`` as ``pretrain ape``, ``points`` (N: points per batch), ``max_shift`` (pair offset, fraction of the
    patch), ``max_scan_fraction`` (each view's share of the scan along its slice axis; 0: no limit)."""

    variant = BatchConfig.variant
    equiv_weight = 1.0
    points = BatchConfig.voxels
    max_shift = BatchConfig.max_shift
    max_scan_fraction = BatchConfig.max_scan_fraction

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = torch.device("cuda")):
        refuse_2d(plans, configuration)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        self.patient_axes: list[tuple[int, bool]] | None = None
        self._best_val_loss: float | None = None

    def initialize(self) -> None:
        super().initialize()
        # batch elements come in pairs of views of one case
        self.batch_size = 2 * max(1, (self.batch_size + 1) // 2)

    @property
    def output_norm(self) -> OutputNorm:
        """The network's output norm (inside DDP and torch.compile's wrappers)."""
        return unwrapped_network(self.network).ape_output_norm

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """The configuration's network with an APE head: 3 outputs through :class:`OutputNorm`, no deep supervision,
        the segmentation layers it does not compute frozen (:func:`freeze_unused_heads`). Refused (one line) when
        stock nnUNetv2_predict builds it: there is nothing to segment."""
        if _called_by_stock_predictor():
            raise SystemExit("nnunet-ape: this is an APE pretraining model, not a segmentation model; fine-tune from it "
                             "with nnUNetv2_train ... -pretrained_weights checkpoint_final.pth, or map positions with "
                             "nnunet-ape embed -m checkpoint_final.pth")
        network = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                           EMBED_DIM, False)
        freeze_unused_heads(network)
        return with_output_norm(network)

    def plot_network_architecture(self) -> None:
        """nnU-Net's plot (with hiddenlayer installed), except under DDP: it runs the network on the first process
        alone, whose output norm would wait for the others' statistics forever."""
        if self.is_ddp:
            self.print_to_log_file("nnunet-ape: no network architecture plot under DDP")
            return
        super().plot_network_architecture()

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """nnU-Net's rotation and scaling, no mirroring: a mirrored body would put left organs on the right."""
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
                                use_mask_for_norm=None, is_cascaded=False, foreground_labels=None, regions=None, ignore_label=None):
        """nnU-Net's training transforms; intensity augmentations on the image channels only (not the positions)."""
        transforms = nnUNetTrainer.get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                                           do_dummy_2d_data_aug, use_mask_for_norm, is_cascaded,
                                                           foreground_labels, regions, ignore_label)
        return intensity_on_image_channels(transforms, self.num_input_channels)

    def get_dataloaders(self):
        """nnU-Net's pipeline (datasets, transforms, augmenter processes) around :class:`ViewPairDataLoader`."""
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch_size = self.configuration_manager.patch_size
        rotation, dummy_2d, initial_patch_size, mirror_axes = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        labels = self.label_manager
        train_transforms = self.get_training_transforms(
            patch_size, rotation, None, mirror_axes, dummy_2d, use_mask_for_norm=self.configuration_manager.use_mask_for_norm,
            is_cascaded=self.is_cascaded, foreground_labels=labels.foreground_labels,
            regions=labels.foreground_regions if labels.has_regions else None, ignore_label=labels.ignore_label)
        val_transforms = self.get_validation_transforms(
            None, is_cascaded=self.is_cascaded, foreground_labels=labels.foreground_labels,
            regions=labels.foreground_regions if labels.has_regions else None, ignore_label=labels.ignore_label)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        views = {"spacing": self.configuration_manager.spacing, "scan_axis": self.plans_manager.transpose_forward.index(0),
                 "max_shift": self.max_shift, "max_scan_fraction": self.max_scan_fraction}
        loaders = [ViewPairDataLoader(dataset, self.batch_size, first_patch, patch_size, labels, transforms=transforms, **views)
                   for dataset, first_patch, transforms in ((dataset_tr, initial_patch_size, train_transforms),
                                                            (dataset_val, patch_size, val_transforms))]
        processes = get_allowed_n_proc_DA()
        if processes == 0:
            generators = [SingleThreadedAugmenter(loader, None) for loader in loaders]
        else:
            generators = [NonDetMultiThreadedAugmenter(data_loader=loader, transform=None, num_processes=n, num_cached=cached,
                                                       seeds=None, pin_memory=self.device.type == "cuda", wait_time=0.002)
                          for loader, n, cached in ((loaders[0], processes, max(6, processes // 2)),
                                                    (loaders[1], max(1, processes // 2), max(3, processes // 4)))]
        for generator in generators:
            next(generator)
        return generators[0], generators[1]

    def on_train_start(self) -> None:
        super().on_train_start()
        self.patient_axes = self._training_case_axes()

    def _training_case_axes(self) -> list[tuple[int, bool]]:
        """:func:`network_axes` of the training cases (the most common one; the log says when cases differ)."""
        dataset_tr, _ = self.get_tr_and_val_datasets()
        found = Counter()
        for key in dataset_tr.identifiers:
            properties = dataset_tr.load_case(key)[3]
            direction = properties.get("sitk_stuff", {}).get("direction", np.eye(3).ravel())
            found[tuple(network_axes(direction, list(self.plans_manager.transpose_forward)))] += 1
        axes, count = found.most_common(1)[0]
        if count < sum(found.values()):
            self.print_to_log_file(f"nnunet-ape: {sum(found.values()) - count} of {sum(found.values())} training cases are "
                                   f"stored in another orientation than the others; the network learns positions along "
                                   f"array axes, so embed uses the orientation of the {count} others")
        return [tuple(a) for a in axes]

    def _ape_loss(self, embeddings: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The APE loss of the network's (normalized) output ``(B, 3, *patch)`` against ``target`` ``(B, 4, *patch)``."""
        return position_channel_loss(embeddings.float(), target.float(), self.variant, self.points, self.equiv_weight)

    def _usable_batch(self, batch: dict, source) -> dict:
        """``batch``, or the next batch of ``source`` with points inside its scan: a batch without any (a view pair
        entirely in padding) has no loss; it is skipped and logged, not allowed to stop a days-long run. Decided
        before the network runs, so that every DDP process runs the same collectives."""
        for _ in range(MAX_SKIPPED_BATCHES):
            if has_points_inside(batch["target"]):
                return batch
            self.print_to_log_file(f"nnunet-ape: skipped a batch of case {batch.get('keys', ['?'])[0]} without points "
                                   f"inside its scan (no APE loss)")
            batch = next(source)
        raise RuntimeError(f"nnunet-ape: {MAX_SKIPPED_BATCHES} batches in a row had no points inside their scans; "
                           f"check the preprocessed cases (empty or tiny images?)")

    def train_step(self, batch: dict) -> dict:
        batch = self._usable_batch(batch, self.dataloader_train)
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(data)
        loss, parts = self._ape_loss(output, target)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return {"loss": np.float32(parts["loss"])}

    @torch.no_grad()
    def validation_step(self, batch: dict) -> dict:
        batch = self._usable_batch(batch, self.dataloader_val)
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(data)
        return {"loss": np.float32(self._ape_loss(output, target)[1]["loss"])}

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        losses = [float(o["loss"]) for o in val_outputs]
        if self.is_ddp:
            import torch.distributed as dist

            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, losses)
            losses = [value for part in gathered for value in part]
        self.logger.log("val_losses", float(np.mean(losses)), self.current_epoch)

    def on_epoch_end(self) -> None:
        """nnU-Net's epoch end with the APE losses: log, periodic and best (lowest validation loss) checkpoints, PNG."""
        from time import time

        self.logger.log("epoch_end_timestamps", time(), self.current_epoch)
        train_loss, val_loss = (self.logger.get_value(k, step=-1) for k in ("train_losses", "val_losses"))
        seconds = self.logger.get_value("epoch_end_timestamps", step=-1) - self.logger.get_value("epoch_start_timestamps", step=-1)
        self.print_to_log_file(f"APE train_loss {train_loss:.4f}  val_loss {val_loss:.4f}  epoch time {seconds:.1f} s")
        if (self.current_epoch + 1) % self.save_every == 0 and self.current_epoch != self.num_epochs - 1:
            self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
        if self._best_val_loss is None or val_loss < self._best_val_loss:
            self._best_val_loss = float(val_loss)
            self.print_to_log_file(f"New best APE validation loss: {val_loss:.4f}")
            self.save_checkpoint(join(self.output_folder, "checkpoint_best.pth"))
        if self.local_rank == 0:
            curves = {"training loss": self.logger.get_value("train_losses", step=None),
                      "validation loss": self.logger.get_value("val_losses", step=None)}
            plot_epoch_losses(curves, join(self.output_folder, "progress.png"),
                              f"APE pretraining ({self.variant}), {self.configuration_name}, fold {self.fold}")
        self.current_epoch += 1

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        self.print_to_log_file("APE pretraining: no segmentation to validate (validation losses are in progress.png)")

    def ape_state(self) -> dict:
        """What ``embed`` needs beyond nnU-Net's checkpoint (module docstring)."""
        return {"format": NNUNET_APE_FORMAT, "variant": self.variant, "patient_axes": self.patient_axes,
                "output_mean": self.output_norm.running_mean.detach().cpu(),
                "output_var": self.output_norm.running_var.detach().cpu()}

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint (same keys) plus ``nnunet_ape`` and nnssl's ``nnssl_adaptation_plan`` (also written as
        ``adaptation_plan.json`` beside it), numpy values made plain and network weights on the CPU, so that
        ``torch.load(weights_only=True)`` reads it on any machine (as nnU-Net's nnssl fine-tuning path loads it);
        written atomically."""
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        module = unwrapped_network(self.network)
        checkpoint = {
            # on the CPU: nnU-Net main's nnssl fine-tuning loads with weights_only and no map_location, so weights
            # saved on a GPU would not load on a machine without one (nnU-Net's own resume maps them to its device)
            "network_weights": {k: v.cpu() for k, v in module.state_dict().items()},  # state_dict() is detached
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": None if self._best_val_loss is None else -self._best_val_loss,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "nnunet_ape": self.ape_state(),
        }
        plan = adaptation_plan(self.plans_manager.plans, self.configuration_name, self.num_input_channels, module)
        if plan is not None:
            checkpoint["nnssl_adaptation_plan"] = plan
            write_plan_json(plan, os.path.dirname(os.path.abspath(filename)))
        save_atomic(without_numpy(checkpoint), filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's resume (``--c``), plus the output norm and axes."""
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            torch.load(filename_or_checkpoint, map_location="cpu", weights_only=False)
        state = checkpoint.get("nnunet_ape", {})
        if "output_mean" in state:
            with torch.no_grad():
                self.output_norm.running_mean.copy_(state["output_mean"].to(self.device))
                self.output_norm.running_var.copy_(state["output_var"].to(self.device))
        self.patient_axes = state.get("patient_axes", self.patient_axes)
        if checkpoint.get("_best_ema") is not None:
            self._best_val_loss = -float(checkpoint["_best_ema"])


__all__ = ["nnUNetTrainerAPEPretrain"]
for _suffix, _epochs, _iterations in (("_1epoch", 1, None), ("_5epochs", 5, None), ("_50epochs", 50, None), ("_smoke", 1, 5)):
    _variant = short_variant(nnUNetTrainerAPEPretrain, _suffix, _epochs, _iterations, module=__name__)
    globals()[_variant.__name__] = _variant
    __all__.append(_variant.__name__)
