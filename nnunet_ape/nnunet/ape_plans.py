"""APE configurations in a dataset's nnU-Net plans file: organ crops and/or embedding channels on top of a planned
configuration (``3d_fullres`` by default).

Each configuration ``inherits_from`` its base and adds:

- ``data_identifier`` of its own (its preprocessed data differ: cropped and/or with channels);
- ``preprocessor_name`` ``nnUNetAPEPreprocessor`` (run by ``nnunet-ape preprocess``; stock ``nnUNetv2_preprocess``
  cannot find it, and fails loudly instead of writing uncropped data);
- ``normalization_schemes`` / ``use_mask_for_norm`` with ``NoNormalization`` / False for each added channel;
- for crops, ``patch_size``, ``batch_size``, ``architecture`` and ``median_image_size_in_voxels`` re-planned by
  nnU-Net's own planner for the crops' median shape (by ``nnunet-ape preprocess``, once the crops exist);
- our settings under ``nnunet_ape`` (:class:`APESettings`), which nnU-Net carries through untouched.

Names: ``{base}_ape_{organ}`` (crop), ``{base}_{channels}`` such as ``3d_fullres_ape`` or ``3d_fullres_ape_bpr``
(channels on whole images), ``{base}_ape_{organ}_{channels}`` (crop + channels); ``_fp16`` appended when the
channels are stored at float16 precision (:data:`CHANNEL_PRECISIONS`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from nnunet_ape.atomic import atomic_path
from nnunet_ape.case_features import added_channel_names
from nnunet_ape.errors import InputError

SETTINGS_KEY = "nnunet_ape"
PLANS_FORMAT = "nnunet-ape/plans-v1"
PREPROCESSOR_NAME = "nnUNetAPEPreprocessor"
# how the added channels are stored: "float32" as computed; "float16" rounded to the nearest float16 value (relative
# error at most 2**-11, about 0.05%), still in nnU-Net's float32 arrays, whose compression then halves their size on disk
CHANNEL_PRECISIONS = ("float32", "float16")
TRAINER_FOR_KIND = {"crop": "nnUNetTrainerAPECrop", "channels": "nnUNetTrainerAPEChannels",
                    "crop+channels": "nnUNetTrainerAPECropChannels"}


@dataclass
class APESettings:
    """One APE configuration's settings (stored in the plans under ``nnunet_ape``).

    ``organs``: the organs whose union box each case is cropped to (empty: whole images); ``labels``: their label
    values in ``dataset.json`` (the other labels become background); ``channels``: added channel kinds (``ape``,
    ``bpr``); ``margin_mm``: how far a training case's box reaches beyond its label; ``models``: localizer and
    checkpoints with their SHA-256; ``crop_plan``: what ``nnunet-ape preprocess`` planned the patch size from;
    ``channel_precision``: how the added channels are stored (:data:`CHANNEL_PRECISIONS`; kept out of the plans
    when ``float32``, so plans written before it existed read, and compare, as they were)."""

    base: str
    organs: list[str]
    labels: dict[str, int]
    channels: list[str]
    margin_mm: float
    models: dict
    crop_plan: dict | None = None
    format: str = PLANS_FORMAT
    channel_names: list[str] = field(default_factory=list)
    channel_precision: str = "float32"

    def __post_init__(self) -> None:
        self.channel_names = added_channel_names(self.channels)
        if self.channel_precision not in CHANNEL_PRECISIONS:
            raise InputError(f"channel precision '{self.channel_precision}': choose from {', '.join(CHANNEL_PRECISIONS)}")
        if self.channel_precision != "float32" and not self.channels:
            raise InputError(f"--channel-precision {self.channel_precision} applies to embedding channels; add --channels")

    @property
    def kind(self) -> str:
        return "+".join(k for k, on in (("crop", bool(self.organs)), ("channels", bool(self.channels))) if on)

    @property
    def trainer(self) -> str:
        return TRAINER_FOR_KIND[self.kind]

    @property
    def localizer_path(self) -> Path | None:
        return Path(self.models["localizer"]) if "localizer" in self.models else None

    def feature_model_args(self) -> dict:
        """Keyword arguments of :func:`nnunet_ape.case_features.load_feature_models` (device excluded)."""
        return {"localizer_path": self.localizer_path, "organs": self.organs or None, "channels": tuple(self.channels),
                "ape_path": Path(self.models["ape_checkpoint"]) if "ape_checkpoint" in self.models else None,
                "bpr_path": Path(self.models["bpr_checkpoint"]) if "bpr_checkpoint" in self.models else None}

    def to_json(self) -> dict:
        out = asdict(self)
        if self.channel_precision == "float32":
            del out["channel_precision"]
        out.update({"kind": self.kind, "trainer": self.trainer})
        return out

    @classmethod
    def from_json(cls, entry: dict) -> "APESettings":
        keys = ("base", "organs", "labels", "channels", "margin_mm", "models", "crop_plan", "format", "channel_precision")
        return cls(**{k: entry[k] for k in keys if k in entry})


def settings_of(configuration: dict) -> APESettings | None:
    """The APE settings of a (resolved) plans configuration dict, or None for a stock configuration."""
    entry = configuration.get(SETTINGS_KEY)
    return APESettings.from_json(entry) if entry else None


def configuration_name(base: str, organs: list[str], channels: list[str], channel_precision: str = "float32") -> str:
    """The configuration name for a base, an organ group (empty: whole images), channel kinds and their precision
    (``_fp16`` appended for ``float16``)."""
    parts = [base]
    if organs:
        parts += ["ape", *organs]
    parts += list(channels)
    if channel_precision == "float16":
        parts.append("fp16")
    return "_".join(parts)


def plans_path(preprocessed: Path, plans_identifier: str) -> Path:
    """The plans file ``PLANS.json`` of a preprocessed dataset folder (it need not exist)."""
    return preprocessed / f"{plans_identifier}.json"


def preprocessed_dataset(spec: str) -> Path:
    """``$nnUNet_preprocessed/DatasetXXX_Name`` for an id, name or folder; InputError when it is not there."""
    path = Path(spec)
    if path.is_dir() and (path / "dataset.json").is_file() and any(path.glob("*Plans*.json")):
        return path
    root = os.environ.get("nnUNet_preprocessed")
    if not root:
        raise InputError("nnUNet_preprocessed is not set; export nnUNet_preprocessed=/path/to/nnUNet_preprocessed")
    prefix = f"Dataset{int(spec):03d}_" if spec.isdigit() else spec.split("/")[-1]
    matches = sorted(p for p in Path(root).glob(f"{prefix}*") if p.is_dir() and (spec.isdigit() or p.name == prefix))
    if not matches:
        raise InputError(f"-d {spec}: no such dataset in nnUNet_preprocessed={root}; run "
                         f"'nnUNetv2_plan_and_preprocess -d {spec} -c 3d_fullres' first")
    return matches[0]


def read_plans(preprocessed: Path, plans_identifier: str) -> dict:
    """The plans ``plans_identifier`` of a preprocessed dataset folder, as a dict; InputError naming the nnU-Net
    command to run when the file is missing."""
    path = plans_path(preprocessed, plans_identifier)
    if not path.is_file():
        raise InputError(f"{path}: no plans; run 'nnUNetv2_plan_experiment -d {preprocessed.name}' "
                         f"(or nnUNetv2_plan_and_preprocess) first, or name them with -p")
    return json.loads(path.read_text())


def write_plans(preprocessed: Path, plans_identifier: str, plans: dict, backup: bool = True) -> Path | None:
    """Replace the plans file atomically, after copying the current one to ``<plans>.json.bak-<timestamp>``
    unless ``backup`` is False; returns the backup's path."""
    path = plans_path(preprocessed, plans_identifier)
    copy = None
    if backup:
        copy = path.with_name(f"{path.name}.bak-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}")
        shutil.copy2(path, copy)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(plans, indent=4))
    return copy


def resolved_configuration(plans: dict, name: str) -> dict:
    """A configuration with its ``inherits_from`` chain merged (as nnU-Net's PlansManager does)."""
    configurations = plans["configurations"]
    if name not in configurations:
        raise InputError(f"configuration '{name}' is not in the plans (it has: {', '.join(configurations)})")
    entry = configurations[name]
    if "inherits_from" in entry:
        merged = resolved_configuration(plans, entry["inherits_from"])
        merged.update({k: v for k, v in entry.items() if k != "inherits_from"})
        return merged
    return dict(entry)


def base_configuration(plans: dict, name: str) -> dict:
    """The resolved plans configuration ``name`` that an APE configuration may build on. InputError for an APE
    configuration, and for a cascade stage that needs a previous stage (``3d_cascade_fullres``): its training
    reads the previous stage's predictions of every case, which APE configurations do not make."""
    base = resolved_configuration(plans, name)
    if SETTINGS_KEY in base:
        raise InputError(f"configuration '{name}' is itself an APE configuration; give a stock one with -c")
    if base.get("previous_stage"):
        raise InputError(f"-c {name}: cascade stages (they train on the predictions of '{base['previous_stage']}') are not "
                         f"supported by APE configurations; build on 3d_fullres or 3d_lowres")
    return base


def ape_configuration(plans: dict, plans_identifier: str, name: str, settings: APESettings) -> dict:
    """The plans entry of a new APE configuration (see the module docstring). A base with a ``next_stage``
    (``3d_lowres``) gives a stand-alone configuration: ``next_stage`` is cleared, so that nnU-Net's validation does
    not predict inputs for a cascade stage this configuration is no part of."""
    base = base_configuration(plans, settings.base)
    n = len(settings.channel_names)
    entry = {
        "inherits_from": settings.base,
        "data_identifier": f"{plans_identifier}_{name}",
        "preprocessor_name": PREPROCESSOR_NAME,
        "normalization_schemes": list(base["normalization_schemes"]) + ["NoNormalization"] * n,
        "use_mask_for_norm": list(base["use_mask_for_norm"]) + [False] * n,
        SETTINGS_KEY: settings.to_json(),
    }
    if base.get("next_stage") is not None:
        entry["next_stage"] = None
    return entry


def add_configurations(preprocessed: Path, plans_identifier: str, entries: dict[str, APESettings],
                       overwrite: bool = False) -> tuple[list[str], Path | None]:
    """Add APE configurations to the plans file (other configurations untouched, a backup kept). A name that
    exists with the same settings is left as it is; with other settings it is an InputError unless
    ``overwrite``. Returns the names added or replaced and the backup path (None when nothing changed)."""
    plans = read_plans(preprocessed, plans_identifier)
    changed = []
    for name, settings in entries.items():
        entry = ape_configuration(plans, plans_identifier, name, settings)
        old = plans["configurations"].get(name)
        if old is not None:
            same = old.get(SETTINGS_KEY) and _same_settings(old[SETTINGS_KEY], entry[SETTINGS_KEY])
            if same:
                continue
            if not overwrite:
                raise InputError(f"configuration '{name}' already exists in {plans_identifier}.json with other settings; "
                                 f"rerun with --overwrite to replace it (then preprocess it again)")
        plans["configurations"][name] = entry
        changed.append(name)
    if not changed:
        return [], None
    return changed, write_plans(preprocessed, plans_identifier, plans)


def _same_settings(a: dict, b: dict) -> bool:
    strip = lambda d: {k: v for k, v in d.items() if k != "crop_plan"}  # noqa: E731
    return strip(a) == strip(b)


def planner_for(plans: dict, plans_identifier: str, dataset_name: str):
    """nnU-Net's experiment planner that made these plans (the class the plans name as ``experiment_planner_used``;
    for plans without it ResEnc M/L/XL by plans name or network class, else the default planner), built for
    ``dataset_name`` with its default GPU memory target (see :func:`memory_target_gb`)."""
    return _planner_class(plans, plans_identifier)(dataset_name, plans_name=plans_identifier)


def _planner_class(plans: dict, plans_identifier: str) -> type:
    import nnunetv2
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.experiment_planners.residual_unets import residual_encoder_unet_planners as resenc
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    used = plans.get("experiment_planner_used")
    if used:  # nnU-Net looks its planners up by name in this package (-pl), as here
        cls = recursive_find_python_class(str(Path(nnunetv2.__path__[0]) / "experiment_planning"), used,
                                          current_module="nnunetv2.experiment_planning")
        if cls is not None:
            return cls
    by_name = {"nnUNetResEncUNetMPlans": resenc.nnUNetPlannerResEncM, "nnUNetResEncUNetLPlans": resenc.nnUNetPlannerResEncL,
               "nnUNetResEncUNetXLPlans": resenc.nnUNetPlannerResEncXL}
    cls = by_name.get(plans_identifier)
    if cls is None:
        network = json.dumps(plans["configurations"])
        cls = resenc.ResEncUNetPlanner if "ResidualEncoderUNet" in network else ExperimentPlanner
    return cls


def _replan(planner, config: dict, median: np.ndarray, n_voxels: float, target_gb: float, cache: dict) -> dict:
    """nnU-Net's ``get_plans_for_configuration`` for ``config``'s spacing and ``median`` (2 entries for 2d) with a
    GPU memory target of ``target_gb``; ``cache`` is the planner's own cache of network memory estimates."""
    planner.UNet_vram_target_GB = target_gb
    return planner.get_plans_for_configuration(np.asarray(config["spacing"]), median, config["data_identifier"], n_voxels, cache)


def _dataset_voxels(plans: dict, config: dict, n_training: int) -> float:
    """nnU-Net's ``approximate_n_voxels_dataset`` of a stock configuration: the full-resolution median's voxels (for
    2d too) times the training cases."""
    median = config["median_image_size_in_voxels"]
    if len(config["spacing"]) == 2 and "3d_fullres" in plans["configurations"]:
        median = resolved_configuration(plans, "3d_fullres")["median_image_size_in_voxels"]
    return float(np.prod(median, dtype=np.float64) * n_training)


_TARGETS: dict[str, tuple[float, str]] = {}  # found memory targets, by planner and configuration
COMMON_TARGETS_GB = (8, 10, 11, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 141)  # GPUs' memory sizes


def memory_target_gb(planner, plans: dict, plans_identifier: str, base: str) -> tuple[float, str]:
    """The GPU memory target (GB) that the stock configuration ``base`` was planned for, and how it was found.
    nnU-Net does not store it (``-gpu_memory_target``, or the ResEnc presets' 8/24/40 GB), so it is a target for which
    ``planner`` plans ``base`` again to its stored patch and batch size: the number in a plans name such as
    ``nnUNetResEncUNetLPlans_40G`` if that one does, else the planner's default if that does, else one found by
    bisection (planned patch volume, then batch size, grow with the target), replaced by the nearest common GPU
    size (:data:`COMMON_TARGETS_GB`) or whole number of GB that still does (a range of targets plans the base
    alike; the crops may differ within it). Plans that no target reproduces (edited by hand) give the planner's
    default."""
    config = resolved_configuration(plans, base)
    default = float(planner.UNet_vram_target_GB)
    stored = (tuple(int(i) for i in config["patch_size"]), int(config["batch_size"]))
    key = json.dumps([type(planner).__name__, plans_identifier, config], sort_keys=True, default=str)
    if key in _TARGETS:
        return _TARGETS[key]
    n_voxels = _dataset_voxels(plans, config, int(planner.dataset_json["numTraining"]))
    cache: dict = {}

    def planned(target: float) -> tuple:
        p = _replan(planner, config, np.asarray(config["median_image_size_in_voxels"]), n_voxels, target, cache)
        return tuple(int(i) for i in p["patch_size"]), int(p["batch_size"])

    def size(result: tuple) -> tuple:
        return int(np.prod(result[0])), result[1]

    named = re.search(r"_(\d+(?:\.\d+)?)G(?:B)?$", plans_identifier)
    found = None
    for target, how in ((float(named.group(1)) if named else None, "the plans name"), (default, "the planner's default")):
        if target is not None and planned(target) == stored:
            found = (target, f"{how}; it plans '{base}' as stored")
            break
    low, high = 0.5, 1024.0
    for _ in range(40 if found is None else 0):  # bisection in log space
        middle = float(np.sqrt(low * high))
        result = planned(middle)
        if result == stored:  # a target in the range that plans so; a round one users give, where one is in it
            near = sorted((t for t in (*COMMON_TARGETS_GB, round(middle)) if 0.67 < t / middle < 1.5),
                          key=lambda t: (t not in COMMON_TARGETS_GB, abs(np.log(t / middle))))
            target = next((float(t) for t in near if planned(t) == stored), round(middle, 2))
            found = (target, f"derived: it plans '{base}' as stored")
            break
        low, high = (middle, high) if size(result) < size(stored) else (low, middle)
    if found is None:
        found = (default, f"the planner's default: no target plans '{base}' as stored")
    planner.UNet_vram_target_GB = default
    _TARGETS[key] = found
    return found


def plan_for_crops(preprocessed: Path, plans_identifier: str, name: str, crop_shapes: list[tuple[int, ...]]) -> dict:
    """Re-plan patch size, batch size and network of configuration ``name`` with nnU-Net's own planner for the
    median of ``crop_shapes`` (preprocessed crops, transposed axes, target spacing), write the plans and return
    what changed (only that configuration changes; no backup)."""
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    plans = read_plans(preprocessed, plans_identifier)
    config = resolved_configuration(plans, name)
    entry = plans["configurations"][name]
    median = np.median(np.asarray(crop_shapes, dtype=np.float64), axis=0)
    n_voxels = float(np.prod(median) * len(crop_shapes))
    in_plane = median[1:] if len(config["spacing"]) == 2 else median  # 2d: the slices' shape, as nnU-Net plans 2d
    planner = planner_for(plans, plans_identifier, preprocessed.name)
    target, how = memory_target_gb(planner, plans, plans_identifier, entry["inherits_from"])
    planned = _replan(planner, config, in_plane, n_voxels, target, {})
    update = {"patch_size": [int(i) for i in planned["patch_size"]], "batch_size": int(planned["batch_size"]),
              "median_image_size_in_voxels": [float(i) for i in in_plane], "architecture": planned["architecture"]}
    recursive_fix_for_json_export(update)  # numpy numbers from the planner, as nnU-Net does before saving plans
    entry.update(update)
    entry[SETTINGS_KEY]["crop_plan"] = {"cases": len(crop_shapes), "median_crop_shape": [float(i) for i in median],
                                        "base_patch_size": resolved_configuration(plans, entry["inherits_from"])["patch_size"],
                                        "gpu_memory_target_gb": target, "gpu_memory_target_from": how}
    write_plans(preprocessed, plans_identifier, plans, backup=False)
    return update

