"""``nnUNetAPEPreprocessor``: nnU-Net's ``DefaultPreprocessor`` that first crops each case to its organ box and/or
appends APE/BPR channels, as the configuration's ``nnunet_ape`` settings say.

Per case, one APE (and one BPR) pass on the whole CT gives the localizer's boxes and the channels
(:func:`nnunet_ape.case_features.case_features`). With a label map (training cases) the box is grown to hold the
chosen organs' whole label plus the margin (:func:`nnunet_ape.crop_geometry.grow_to_contain`) and the other labels
become background (the ignore label, where the dataset has one, stays: its voxels are unannotated, not
background). The crop is cut in the source's own voxel grid; then nnU-Net's own steps run (transpose,
nonzero crop, normalization, resampling) and the crop is composed into nnU-Net's ``bbox_used_for_cropping`` and
``shape_before_cropping``, so that nnU-Net's export pastes every prediction back into the full image by itself.
What the crop was is kept in the case's properties under ``nnunet_ape`` (source voxel boxes, x/y/z order).
A configuration with ``channel_precision`` ``float16`` gets its added channels rounded to float16 values after
nnU-Net's resampling (:func:`round_added_channels`); nnU-Net still writes and reads float32 arrays.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

from nnunet_ape.case_features import (CaseFeatures, FeatureModels, case_features, case_features_many, load_feature_models,
                                      with_organs)
from nnunet_ape.checkpoint import file_hash
from nnunet_ape.crop_geometry import fraction_inside, grow_to_contain, slices
from nnunet_ape.errors import InputError
from nnunet_ape.io import Volume
from nnunet_ape.nnunet.ape_plans import APESettings, settings_of


def volume_from_nnunet(image: np.ndarray, properties: dict) -> Volume:
    """One channel as nnU-Net's SimpleITK reader gives it (``(Z, Y, X)``, geometry in ``properties['sitk_stuff']``)
    -> a :class:`Volume` ``(X, Y, Z)`` (a view, no copy). InputError for another reader or non-finite voxels."""
    geometry = properties.get("sitk_stuff")
    if geometry is None:
        raise InputError("APE configurations need images read by nnU-Net's SimpleITKIO (NIfTI, NRRD, MHA); this "
                         "dataset's reader gives no image geometry")
    if not np.isfinite(image).all():
        raise InputError("image has NaN or infinite voxels; fix the file (nnU-Net would train on them)")
    direction = np.asarray(geometry["direction"], dtype=np.float64).reshape(3, 3)
    return Volume(image.transpose(2, 1, 0), tuple(geometry["spacing"]), tuple(geometry["origin"]), direction)


def compose_crop(properties: dict, box: np.ndarray, full_shape_zyx: tuple[int, ...], transpose_forward: list[int]) -> None:
    """After nnU-Net preprocessed a crop: make ``bbox_used_for_cropping`` (transposed axes, relative to the crop)
    and ``shape_before_cropping`` refer to the full image, for a crop box ``box`` ``(2, 3)`` in source x/y/z voxels."""
    lo_zyx = np.asarray(box[0])[::-1]
    offset = [int(lo_zyx[i]) for i in transpose_forward]
    properties["bbox_used_for_cropping"] = [[int(lo) + o, int(hi) + o]
                                            for (lo, hi), o in zip(properties["bbox_used_for_cropping"], offset)]
    properties["shape_before_cropping"] = tuple(int(full_shape_zyx[i]) for i in transpose_forward)


class SourceChannelsPreprocessor(DefaultPreprocessor):
    """DefaultPreprocessor whose normalization skips channels the dataset fingerprint has no intensities for: the
    channels an APE configuration adds (``noNorm``; nnU-Net's own ``_normalize`` looks up every channel's
    intensities and fails on them). Also used as is by ``nnunet-ape predict`` on crops it cut itself."""

    def _normalize(self, data: np.ndarray, seg: np.ndarray, configuration_manager, intensity_properties: dict) -> np.ndarray:
        """nnU-Net's normalization of the channels with fingerprint intensities (the first ones); the rest unchanged."""
        n_source = sum(1 for c in range(data.shape[0]) if str(c) in intensity_properties)
        super()._normalize(data[:n_source], seg, configuration_manager, intensity_properties)  # in place on the view
        return data


class nnUNetAPEPreprocessor(SourceChannelsPreprocessor):
    """DefaultPreprocessor + organ crop and/or embedding channels. nnU-Net builds it as ``cls(verbose=...)``;
    ``device`` (an attribute) says where the APE/BPR models run. Models load once per process, on first use, and
    configurations with the same checkpoints share them. Within :meth:`shared_case`, the configurations of one case
    share its read files and one APE (and BPR) pass."""

    def __init__(self, verbose: bool = True):
        super().__init__(verbose)
        self.device = "cpu"
        self._loaded: dict[str, FeatureModels] = {}
        self._case: dict | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_loaded"], state["_case"] = {}, None  # workers load their own
        return state

    def models(self, settings: APESettings) -> FeatureModels:
        """The localizer and APE/BPR models of ``settings`` for its organs, loaded on first use (SHA-256 checked)
        and shared with the other configurations of the same checkpoints."""
        args = settings.feature_model_args()
        organs = args.pop("organs")
        key = repr(sorted((k, str(v)) for k, v in args.items()))
        if key not in self._loaded:
            for kind in ("ape", "bpr"):
                path = settings.models.get(f"{kind}_checkpoint")
                if path and "localizer" not in settings.models and file_hash(path) != settings.models[f"{kind}_sha256"]:
                    raise InputError(f"{path}: not the checkpoint this configuration was planned with (SHA-256 differs); "
                                     f"plan it again with 'nnunet-ape plan ... --overwrite'")
            self._loaded[key] = load_feature_models(**args, organs=None, device=self.device)
        return with_organs(self._loaded[key], organs, args["localizer_path"])

    @contextmanager
    def shared_case(self, configurations: list[APESettings]):
        """Within this context, the calls of :meth:`run_case` (and ``run_case_save``) for one case, one per
        configuration of ``configurations``, read its files once and share its features: one APE network pass per
        checkpoint, one BPR pass, one localization per localizer for all their organ groups
        (:func:`~nnunet_ape.case_features.case_features_many`). Each configuration's output is what it would be
        alone."""
        self._case = {"configurations": configurations}
        try:
            yield
        finally:
            self._case = None

    def run_case(self, image_files: list[str], seg_file: str | None, plans_manager, configuration_manager,
                 dataset_json: dict | str):
        """nnU-Net's ``run_case`` (read the files, then :meth:`run_case_npy`); within :meth:`shared_case` the files
        are read once for all configurations (every call gets its own copy of the properties)."""
        if self._case is None:
            return super().run_case(image_files, seg_file, plans_manager, configuration_manager, dataset_json)
        files = (tuple(image_files), seg_file)
        if self._case.get("files") != files:
            reader = plans_manager.image_reader_writer_class()
            data, properties = reader.read_images(image_files)
            seg = reader.read_seg(seg_file)[0] if seg_file is not None else None
            self._case.update(files=files, read=(data, seg, properties), features={})
        if isinstance(dataset_json, str):
            dataset_json = load_json(dataset_json)
        data, seg, properties = self._case["read"]
        return self.run_case_npy(data, seg, copy.deepcopy(properties), plans_manager, configuration_manager, dataset_json)

    def _features(self, settings: APESettings, ct: Volume) -> CaseFeatures:
        """The case's boxes and channels for ``settings``; within :meth:`shared_case`, computed for all its
        configurations in one pass on the first call."""
        if self._case is None:
            return case_features(self.models(settings), ct)
        key = _features_key(settings)
        features = self._case.setdefault("features", {})
        if key not in features:
            together = {_features_key(s): s for s in [*self._case["configurations"], settings]}
            computed = case_features_many([self.models(s) for s in together.values()], ct)
            features.update(zip(together, computed))
        return features[key]

    def run_case_npy(self, data: np.ndarray, seg: np.ndarray | None, properties: dict, plans_manager,
                     configuration_manager, dataset_json: dict | str):
        """``data`` ``(C, Z, Y, X)``, ``seg`` ``(1, Z, Y, X)`` or None, as nnU-Net's reader gives them -> nnU-Net's
        preprocessed ``(data, seg, properties)`` of the crop (with the channels appended after the source's)."""
        settings = settings_of(configuration_manager.configuration)
        if settings is None:
            raise InputError("configuration has no 'nnunet_ape' settings; preprocess it with nnUNetv2_preprocess")
        ct = volume_from_nnunet(data[0], properties)
        features = self._features(settings, ct)
        full_shape = data.shape[1:]
        record: dict = {"transpose_forward": [int(i) for i in plans_manager.transpose_forward]}
        box = None
        if settings.organs:
            box = predicted = features.crop_box
            record["predicted_box_voxels"] = predicted.tolist()
            if seg is not None:
                values = [settings.labels[o] for o in settings.organs]
                label = seg[0].transpose(2, 1, 0)
                record["organ_fraction_in_predicted_box"] = {o: fraction_inside(label == v, predicted)
                                                             for o, v in zip(settings.organs, values)}
                box, grown_mm = grow_to_contain(predicted, np.isin(label, values), settings.margin_mm, ct.spacing)
                record["grown_mm"] = grown_mm.round(2).tolist()
                seg = np.where(np.isin(seg, values + _ignore_label(plans_manager, dataset_json)), seg, 0).astype(seg.dtype)
            record["box_voxels"] = box.tolist()
        if features.channels is not None:
            added = np.ascontiguousarray(features.channels.transpose(3, 2, 1, 0))  # (n, Z, Y, X)
            data = np.concatenate([data.astype(np.float32, copy=False), added], axis=0)
        if box is not None:
            cut = (slice(None), *slices(box)[::-1])
            data = data[cut]
            seg = seg[cut] if seg is not None else None
        data, seg, properties = super().run_case_npy(data, seg, properties, plans_manager, configuration_manager, dataset_json)
        data = round_added_channels(data, len(settings.channel_names), settings.channel_precision)
        if box is not None:
            compose_crop(properties, box, full_shape, plans_manager.transpose_forward)
        properties["nnunet_ape"] = record
        return data, seg, properties


def round_added_channels(data: np.ndarray, n_added: int, precision: str) -> np.ndarray:
    """``data`` ``(C, Z, Y, X)`` as float32 with its last ``n_added`` channels rounded to the nearest ``precision``
    value (``float16``: relative error at most 2**-11; ``float32``: unchanged), in place where ``data`` is float32
    already. The float32 array's low mantissa bits are then zero, which nnU-Net's blosc2 compression stores in about
    half the bytes. InputError when a value is beyond float16's range (65504)."""
    data = data.astype(np.float32, copy=False)
    if precision == "float32" or n_added == 0:
        return data
    for channel in data[data.shape[0] - n_added:]:  # one channel at a time: a float16 copy of one, not of all
        with np.errstate(over="ignore"):  # beyond the range: inf, refused below
            rounded = channel.astype(precision)
        if not np.isfinite(rounded).all():
            raise InputError(f"an embedding channel has values beyond {precision}'s range; plan this configuration "
                             f"with --channel-precision float32")
        channel[...] = rounded
    return data


def _features_key(settings: APESettings) -> str:
    """What a configuration's features depend on: its organs, channels and models."""
    return repr(sorted((k, str(v)) for k, v in settings.feature_model_args().items()))


def _ignore_label(plans_manager, dataset_json: dict | str) -> list[int]:
    """The dataset's ignore label value (``"ignore"`` in dataset.json's labels) as a one-element list, or []."""
    dataset_json = load_json(dataset_json) if isinstance(dataset_json, str) else dataset_json
    ignore = plans_manager.get_label_manager(dataset_json).ignore_label
    return [] if ignore is None else [int(ignore)]
