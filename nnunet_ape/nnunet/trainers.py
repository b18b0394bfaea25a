"""nnU-Net trainers for APE configurations (``nnunet-ape plan``): ``nnUNetTrainerAPECrop`` (organ crops),
``nnUNetTrainerAPEChannels`` (embedding channels on whole images), ``nnUNetTrainerAPECropChannels`` (both), each
with short variants ``_1epoch``, ``_5epochs`` (nnU-Net's naming) and ``_smoke`` (5 iterations, for a first check).

nnU-Net finds them through ``nnUNet_extTrainer`` pointing at the repository's ``trainers/`` folder (``nnunet-ape
trainers-path``), whose module only re-exports this one, so nnU-Net's spawned workers can pickle them.

What they change in nnU-Net's trainer, and nothing else:

- the data are the configuration's own preprocessed crops/channels (``nnunet-ape preprocess``); the trainer checks
  that the configuration is one of its kind;
- input channels: the dataset's plus the added ones (``dataset.json`` of the results lists them, so nnU-Net counts
  them everywhere), and nnU-Net's intensity augmentations touch the source channels only;
- validation (nnU-Net's ``perform_actual_validation``): crop models predict each validation case on the
  localizer's box, not on its label-grown training box, nnU-Net pastes the prediction into the full image, and
  ``summary.json`` scores the chosen organs against the full ground truth (all labels: ``summary_all_labels.json``);
- ``-pretrained_weights`` from a model with fewer input channels works (new channels start at zero weight); the
  ``_encoderInit`` variants (and ``nnUNetTrainerEncoderInit``, stock training otherwise) load the encoder and stem
  only, as nnU-Net's nnssl fine-tuning does;
- stock ``nnUNetv2_predict`` cannot make crops or channels, so on these models it stops with one line naming
  ``nnunet-ape predict``.

``nnUNetTrainerDatasetChannels`` is stock nnU-Net training for the datasets ``crop-dataset --channels`` and
``channels-dataset`` write, with the intensity augmentations kept off their embedding channels.
"""

from __future__ import annotations

import json
import os
import sys
from copy import deepcopy

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ape.case_features import CHANNEL_NAMES
from nnunet_ape.nnunet import pretrained_weights
from nnunet_ape.nnunet.ape_plans import TRAINER_FOR_KIND, APESettings, resolved_configuration, settings_of
from nnunet_ape.nnunet.channel_augmentation import intensity_on_image_channels
from nnunet_ape.nnunet.organ_summary import organ_summary
from nnunet_ape.nnunet.validation_boxes import predicted_box_dataset_class

def _called_by_stock_predictor() -> bool:
    """True inside nnU-Net's ``nnUNetPredictor.initialize_from_trained_model_folder`` (stock ``nnUNetv2_predict``,
    the only place nnU-Net builds a trained model's network: it calls ``build_network_architecture`` and nothing else
    of the trainer, and has no hook to refuse with); ``nnunet-ape predict`` builds the network itself
    (:mod:`nnunet_ape.nnunet.trained_model`). Looks for that method's own code object on the call stack, so a moved
    file still matches; ``tests/test_nnunet_internals.py`` drives the real method and fails if nnU-Net renames or
    restructures it."""
    module = sys.modules.get("nnunetv2.inference.predict_from_raw_data")
    method = getattr(getattr(module, "nnUNetPredictor", None), "initialize_from_trained_model_folder", None)
    code = getattr(method, "__code__", None)
    frame = sys._getframe(1)
    while frame is not None and code is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def with_added_channels(dataset_json: dict, settings: APESettings) -> dict:
    """``dataset_json`` with the added channels appended to ``channel_names`` (values ``noNorm``, as nnU-Net reads
    them) and our settings' summary under ``nnunet_ape``."""
    out = deepcopy(dataset_json)
    names = out["channel_names"]
    n = len(names)
    names.update({str(n + i): "noNorm" for i in range(len(settings.channel_names))})
    out.setdefault("nnunet_ape", {}).update({"configuration_kind": settings.kind, "added_channels": settings.channel_names,
                                             "organs": settings.organs})
    return out


def configuration_settings(plans: dict, configuration: str, trainer: type) -> APESettings:
    """The APE settings of ``configuration``; SystemExit with one line when it has none or is of another kind
    than ``trainer`` trains (``nnUNetTrainerAPE`` itself trains every kind)."""
    settings = settings_of(resolved_configuration(plans, configuration))
    if settings is None:
        raise SystemExit(f"nnunet-ape: configuration '{configuration}' is a stock nnU-Net configuration; add APE "
                         f"configurations with 'nnunet-ape plan' and train those with -tr {trainer.__name__}")
    expected = globals()[settings.trainer]
    if trainer is not nnUNetTrainerAPE and not issubclass(trainer, expected):
        raise SystemExit(f"nnunet-ape: configuration '{configuration}' is a {settings.kind} configuration; train it "
                         f"with -tr {settings.trainer}")
    return settings


class nnUNetTrainerAPE(nnUNetTrainer):
    """The shared implementation; train with one of the named subclasses (they check the configuration's kind).
    ``pretrained_transfer``: what ``-pretrained_weights`` loads, ``"all"`` weights but the heads (new input channels
    at zero weight) or ``"encoder"`` only (the ``_encoderInit`` variants; :mod:`nnunet_ape.nnunet.pretrained_weights`)."""

    pretrained_transfer = "all"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = torch.device("cuda")):
        settings = configuration_settings(plans, configuration, type(self))
        n_source = len(dataset_json["channel_names"])
        dataset_json = with_added_channels(dataset_json, settings)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.ape_settings = settings
        self.num_image_channels = n_source

    def initialize(self) -> None:
        pretrained_weights.install_in_nnunet(self.pretrained_transfer)  # run_training loads -pretrained_weights right after this
        super().initialize()

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> torch.nn.Module:
        """nnU-Net's network; refused (one line) when stock nnUNetv2_predict builds it for prediction."""
        if _called_by_stock_predictor():
            raise SystemExit("nnunet-ape: this model was trained on APE crops/channels, which nnUNetv2_predict does not "
                             "make; predict with 'nnunet-ape predict' (it localizes, crops, adds the channels and pastes back)")
        return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
                                use_mask_for_norm=None, is_cascaded=False, foreground_labels=None, regions=None, ignore_label=None):
        """nnU-Net's training transforms; with added channels its intensity augmentations touch the source channels only."""
        transforms = nnUNetTrainer.get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                                           do_dummy_2d_data_aug, use_mask_for_norm, is_cascaded,
                                                           foreground_labels, regions, ignore_label)
        if self.ape_settings.channels:
            transforms = intensity_on_image_channels(transforms, self.num_image_channels)
        return transforms

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net's validation; crop models on the localizer's boxes, scored on the chosen organs (see module doc)."""
        if not self.ape_settings.organs:
            return super().perform_actual_validation(save_probabilities)
        training_class = self.dataset_class  # set by initialize()
        self.dataset_class = predicted_box_dataset_class(training_class)
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.dataset_class = training_class
        if self.local_rank == 0:
            self._score_chosen_organs()

    def _score_chosen_organs(self) -> None:
        folder = os.path.join(self.output_folder, "validation")
        summary = os.path.join(folder, "summary.json")
        with open(summary) as f:
            everything = json.load(f)
        os.replace(summary, os.path.join(folder, "summary_all_labels.json"))
        organs = organ_summary(everything, [self.ape_settings.labels[o] for o in self.ape_settings.organs])
        with open(summary, "w") as f:
            json.dump(organs, f, indent=4)
        self.print_to_log_file(f"Mean validation Dice of {', '.join(self.ape_settings.organs)} on the full images "
                               f"(localizer boxes, pasted back): {organs['foreground_mean']['Dice']}", also_print_to_console=True)


class nnUNetTrainerAPECrop(nnUNetTrainerAPE):
    """Organ crops: each case is its organ box (localizer box; training cases grown to hold the label)."""


class nnUNetTrainerAPEChannels(nnUNetTrainerAPE):
    """Whole images + 3 APE (and 1 BPR) input channels."""


class nnUNetTrainerAPECropChannels(nnUNetTrainerAPE):
    """Organ crops + embedding channels (the embeddings of the whole CT, cropped)."""


def source_channel_count(dataset_json: dict) -> int:
    """How many leading input channels of a ``crop-dataset``/``channels-dataset`` dataset are image channels: its
    ``channel_names`` less the embedding channels that ``dataset.json["nnunet_ape"]["channels"]`` names (APE_x,
    APE_y, APE_z, BPR; they come last). All channels for any other dataset."""
    embedding = {name for names in CHANNEL_NAMES.values() for name in names}
    listed = (dataset_json.get("nnunet_ape") or {}).get("channels") or []
    return len(dataset_json["channel_names"]) - sum(1 for name in listed if name in embedding)


class nnUNetTrainerDatasetChannels(nnUNetTrainer):
    """Stock nnU-Net training for a dataset that ``crop-dataset --channels`` or ``channels-dataset`` wrote: nnU-Net's
    intensity augmentations touch its image channels only, not the embedding channels (positions, which stock
    training would scale, blur and gamma-correct). Nothing else differs: stock ``nnUNetv2_predict -tr`` this trainer
    predicts with it."""

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
                                use_mask_for_norm=None, is_cascaded=False, foreground_labels=None, regions=None, ignore_label=None):
        """nnU-Net's training transforms, intensity augmentations on the image channels only."""
        transforms = nnUNetTrainer.get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                                           do_dummy_2d_data_aug, use_mask_for_norm, is_cascaded,
                                                           foreground_labels, regions, ignore_label)
        n_source = source_channel_count(self.dataset_json)
        if n_source < len(self.dataset_json["channel_names"]):
            transforms = intensity_on_image_channels(transforms, n_source)
        return transforms


class nnUNetTrainerEncoderInit(nnUNetTrainer):
    """Stock nnU-Net segmentation training whose ``-pretrained_weights`` loads the encoder and stem only, as nnU-Net's
    nnssl fine-tuning does (the decoder and heads start fresh, a 1-channel input projection is repeated over the input
    channels; :func:`nnunet_ape.nnunet.pretrained_weights.load_pretrained_encoder`), from our pretraining checkpoints
    or nnssl's. Stock ``nnUNetv2_predict -tr`` this trainer predicts with it."""

    pretrained_transfer = "encoder"

    def initialize(self) -> None:
        pretrained_weights.install_in_nnunet(self.pretrained_transfer)  # run_training loads -pretrained_weights right after this
        super().initialize()


def encoder_init_variant(base: type, module: str = __name__) -> type:
    """``base`` with ``pretrained_transfer = "encoder"``, named ``base.__name__ + "_encoderInit"`` and placed in
    ``module`` (whose globals must then hold it, for pickling)."""
    name = base.__name__ + "_encoderInit"
    return type(name, (base,), {"pretrained_transfer": "encoder", "__module__": module, "__qualname__": name,
                                "__doc__": f"{base.__name__}, -pretrained_weights loading the encoder and stem only."})


def short_variant(base: type, suffix: str, epochs: int, iterations: int | None = None, validation_mirroring: bool = True,
                  module: str = __name__) -> type:
    """``base`` trained for ``epochs`` epochs (of ``iterations`` iterations, validation ``iterations // 2``), named
    ``base.__name__ + suffix`` and placed in ``module`` (whose globals must then hold it, for pickling)."""
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs
        if iterations is not None:
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = max(1, iterations // 2)

    attributes = {"__init__": __init__}
    if not validation_mirroring:
        def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
            rotation, dummy_2d, initial_patch_size, mirror_axes = base.configure_rotation_dummyDA_mirroring_and_inital_patch_size(self)
            self.inference_allowed_mirroring_axes = None
            return rotation, dummy_2d, initial_patch_size, mirror_axes

        attributes["configure_rotation_dummyDA_mirroring_and_inital_patch_size"] = configure_rotation_dummyDA_mirroring_and_inital_patch_size
    name = base.__name__ + suffix
    what = f"{epochs} epoch(s)" + (f" of {iterations} iterations" if iterations else "") + \
        ("" if validation_mirroring else ", validation without mirroring")
    attributes.update({"__module__": module, "__qualname__": name, "__doc__": f"{base.__name__}, {what}."})
    return type(name, (base,), attributes)


__all__ = ["nnUNetTrainerAPECrop", "nnUNetTrainerAPEChannels", "nnUNetTrainerAPECropChannels", "nnUNetTrainerDatasetChannels",
           "nnUNetTrainerEncoderInit"]
for _base in (nnUNetTrainerAPECrop, nnUNetTrainerAPEChannels, nnUNetTrainerAPECropChannels):
    _variant = encoder_init_variant(_base)
    globals()[_variant.__name__] = _variant
    __all__.append(_variant.__name__)
for _base in (nnUNetTrainerAPECrop, nnUNetTrainerAPEChannels, nnUNetTrainerAPECropChannels, nnUNetTrainerDatasetChannels):
    for _variant in (short_variant(_base, "_1epoch", 1), short_variant(_base, "_5epochs", 5),
                     short_variant(_base, "_smoke", 1, iterations=5, validation_mirroring=False)):
        globals()[_variant.__name__] = _variant
        __all__.append(_variant.__name__)
assert set(TRAINER_FOR_KIND.values()) <= set(__all__)
