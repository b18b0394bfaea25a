"""A trained nnU-Net model as ``nnunet-ape predict`` uses it: nnU-Net's own predictor (in this process, loaded once)
and what the model needs as input and gives as output.

Four kinds of model folder (``$nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIGURATION``):

- an APE configuration (``nnunet-ape plan``; settings in the plans): ``crop``, ``channels`` or ``crop+channels``,
  the localizer and checkpoints named by the settings; label values are the dataset's own;
- a model of a crop dataset or channels dataset (``nnunet-ape crop-dataset`` / ``channels-dataset``, trained with
  stock nnU-Net): its ``dataset.json`` names the dataset, whose manifest ``crops.json`` gives the localizer, the
  checkpoints and the map back to the source dataset's label values;
- any other model: ``full`` (plain full-image nnU-Net prediction; the baseline).

The network is built from the plans and the checkpoint's weights loaded with nnU-Net's
``manual_initialization``, so no trainer lookup is needed (``nnUNetv2_predict``'s lookup runs our trainers'
refusal; see :mod:`nnunet_ape.nnunet.trainers`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from nnunet_ape.case_features import CHANNEL_NAMES
from nnunet_ape.errors import InputError
from nnunet_ape.nnunet.ape_plans import resolved_configuration, settings_of
from nnunet_ape.nnunet.uncrop import find_manifest

FULL, CROP, CHANNELS, CROP_CHANNELS = "full", "crop", "channels", "crop+channels"


@dataclass
class PredictorOptions:
    """nnU-Net's predictor settings (``nnUNetPredictor``): tile overlap, Gaussian blending, mirroring (TTA), device."""

    tile_step_size: float = 0.5
    use_gaussian: bool = True
    use_mirroring: bool = True
    device: str = "cpu"


@dataclass
class TrainedModel:
    """One trained model, ready to predict.

    ``kind``: full / crop / channels / crop+channels; ``organs``: the organ names it segments (a whole-image model:
    every label); ``to_output``: model label value -> output label value (the source dataset's; other model labels
    are dropped); ``output_labels``: output name -> value; ``feature_args``: the arguments of
    :func:`nnunet_ape.case_features.load_feature_models` (None for ``full``); ``source_channels``: how many image
    channels the model reads before the added ones; ``added_channels``: the added channel kinds (``ape``, ``bpr``);
    ``channel_precision``: the precision the added channels were trained at (``float16``: rounded as in training)."""

    name: str
    folder: Path
    predictor: object
    kind: str
    organs: list[str]
    to_output: dict[int, int]
    output_labels: dict[str, int]
    feature_args: dict | None
    source_channels: int
    added_channels: tuple[str, ...]
    file_ending: str
    channel_precision: str = "float32"

    @property
    def crops(self) -> bool:
        return self.kind in (CROP, CROP_CHANNELS)


def dataset_results(dataset: str) -> Path:
    """``$nnUNet_results/DatasetXXX_Name`` for an id or name; InputError (one line) when it is missing."""
    root = os.environ.get("nnUNet_results")
    if not root:
        raise InputError("nnUNet_results is not set; export nnUNet_results=/path/to/nnUNet_results")
    prefix = f"Dataset{int(dataset):03d}_" if dataset.isdigit() else dataset
    matches = sorted(p for p in Path(root).glob(f"{prefix}*") if p.is_dir() and (dataset.isdigit() or p.name == dataset))
    if not matches:
        raise InputError(f"-d {dataset}: no such dataset in nnUNet_results={root}")
    return matches[0]


def results_folder(dataset: str, trainer: str, plans: str, configuration: str) -> Path:
    """``$nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION``; InputError (one line) when it is missing."""
    root = dataset_results(dataset)
    folder = root / f"{trainer}__{plans}__{configuration}"
    if not folder.is_dir():
        trained = sorted(p.name for p in root.iterdir() if p.is_dir() and "__" in p.name)
        raise InputError(f"{folder.name}: not trained in {root} (trained: {', '.join(trained) or 'nothing'}); "
                         f"check -c, -tr and -p")
    missing = [name for name in ("dataset.json", "plans.json") if not (folder / name).is_file()]
    if missing:
        raise InputError(f"{folder}: no {missing[0]} (nnUNetv2_train writes it when training starts); is training started?")
    return folder


def available_folds(folder: Path, checkpoint: str) -> list[str]:
    """Folds of ``folder`` that hold ``checkpoint`` (``0``..``4``, ``all``), as nnU-Net finds them."""
    return sorted(p.name[len("fold_"):] for p in folder.glob("fold_*") if (p / checkpoint).is_file())


def _trainer_class(name: str):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_ape.nnunet import trainers

    if hasattr(trainers, name):
        return getattr(trainers, name)
    try:
        return recursive_find_trainer_class_by_name(name)
    except RuntimeError:  # a trainer we cannot import: the plans alone describe the network
        return nnUNetTrainer


def load_predictor(folder: Path, folds: list[str] | None, checkpoint: str, options: PredictorOptions):
    """nnU-Net's ``nnUNetPredictor`` for the model in ``folder`` with the weights of ``folds`` (default: every fold
    that has ``checkpoint``), initialised in this process. InputError for a missing fold or checkpoint."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    found = available_folds(folder, checkpoint)
    folds = [str(f) for f in folds] if folds else found
    missing = [f for f in folds if f not in found]
    if not folds or missing:
        raise InputError(f"{folder}: no {checkpoint} for fold {missing[0] if missing else '0-4'} "
                         f"(folds with it: {', '.join(found) or 'none'}); train it or choose -f / -chk")
    dataset_json = json.loads((folder / "dataset.json").read_text())
    plans_manager = PlansManager(json.loads((folder / "plans.json").read_text()))
    parameters, first = [], None
    for fold in folds:
        state = torch.load(folder / f"fold_{fold}" / checkpoint, map_location="cpu", weights_only=False)
        first = first or state
        parameters.append(state["network_weights"])
    configuration_manager = plans_manager.get_configuration(first["init_args"]["configuration"])
    label_manager = plans_manager.get_label_manager(dataset_json)
    num_inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    network = _trainer_class(first["trainer_name"]).build_network_architecture(
        plans_manager, configuration_manager, num_inputs, label_manager.num_segmentation_heads, enable_deep_supervision=False)
    network.load_state_dict(parameters[0])
    device = torch.device(options.device)
    with contextlib.redirect_stdout(io.StringIO()):  # its note that on-device mode is for CUDA only
        predictor = nnUNetPredictor(tile_step_size=options.tile_step_size, use_gaussian=options.use_gaussian,
                                    use_mirroring=options.use_mirroring, perform_everything_on_device=device.type == "cuda",
                                    device=device, verbose=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                    first["trainer_name"], first.get("inference_allowed_mirroring_axes"))
    return predictor


def _labels(dataset_json: dict, folder: Path) -> dict[str, int]:
    labels = dataset_json["labels"]
    if any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise InputError(f"{folder}: a region-based model (labels with lists of values); nnunet-ape predict merges "
                         "plain label maps only")
    return {k: int(v) for k, v in labels.items()}


def open_model(folder: Path, folds: list[str] | None, checkpoint: str, options: PredictorOptions) -> TrainedModel:
    """Load the model in ``folder`` (a results folder) and find out what kind it is (see the module docstring)."""
    dataset_json = json.loads((folder / "dataset.json").read_text())
    plans = json.loads((folder / "plans.json").read_text())
    configuration = folder.name.split("__")[-1]
    labels = _labels(dataset_json, folder)
    foreground = {v: v for k, v in labels.items() if v != 0}
    settings = settings_of(resolved_configuration(plans, configuration)) if configuration in plans["configurations"] else None
    info = dataset_json.get("nnunet_ape") or {}
    name = f"{folder.parent.name}/{folder.name}"
    predictor = load_predictor(folder, folds, checkpoint, options)
    common = {"name": name, "folder": folder, "predictor": predictor, "file_ending": dataset_json["file_ending"]}
    if settings is not None:
        organs = settings.organs or [k for k in labels if k != "background"]
        values = {settings.labels[o]: settings.labels[o] for o in settings.organs} if settings.organs else foreground
        return TrainedModel(kind=settings.kind, organs=organs, to_output=values, output_labels=labels,
                            feature_args=settings.feature_model_args(),
                            source_channels=len(dataset_json["channel_names"]) - len(settings.channel_names),
                            added_channels=tuple(settings.channels), channel_precision=settings.channel_precision, **common)
    if info.get("kind") in ("crops", "channels"):
        manifest = find_manifest(folder, kinds=("crops", "channels"))
        added = tuple(kind for kind, names in CHANNEL_NAMES.items() if names[0] in manifest["channels"])
        n_added = sum(len(CHANNEL_NAMES[k]) for k in added)
        to_output = {int(t): int(s) for t, s in manifest["target_to_source_label"].items() if int(t) != 0}
        source_json = Path(manifest["source_dataset"]) / "dataset.json"
        source_labels = _labels(json.loads(source_json.read_text()), source_json) if source_json.is_file() else \
            {"background": 0, **{k: to_output[v] for k, v in manifest["labels"].items() if v in to_output}}
        models = {k: Path(manifest[k]) if k in manifest else None for k in ("localizer", "ape_checkpoint", "bpr_checkpoint")}
        organs = manifest["organs"] or [k for k, v in source_labels.items() if v in to_output.values()]
        kind = (CROP_CHANNELS if added else CROP) if manifest["kind"] == "crops" else CHANNELS
        return TrainedModel(kind=kind, organs=organs, to_output=to_output, output_labels=source_labels,
                            feature_args={"localizer_path": models["localizer"], "organs": manifest["organs"] or None,
                                          "channels": added, "ape_path": models["ape_checkpoint"],
                                          "bpr_path": models["bpr_checkpoint"]},
                            source_channels=len(dataset_json["channel_names"]) - n_added, added_channels=added, **common)
    return TrainedModel(kind=FULL, organs=[k for k in labels if k != "background"], to_output=foreground,
                        output_labels=labels, feature_args=None, source_channels=len(dataset_json["channel_names"]),
                        added_channels=(), **common)
