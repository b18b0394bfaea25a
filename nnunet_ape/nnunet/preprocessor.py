"""``nnUNetAPEPreprocessor``: nnU-Net's ``DefaultPreprocessor`` that first crops each case to its organ box and/or
appends APE/BPR channels, as the configuration's ``nnunet_ape`` settings say.

Per case, one APE (and one BPR) pass on the whole CT gives the localizer's boxes and the channels
(:func:`nnunet_ape.case_features.case_features`). With a label map (training cases) the box is grown to hold the
chosen organs' whole label plus the margin (:func:`nnunet_ape.crop_geometry.grow_to_contain`) and the other labels
become background. The crop is cut in the source's own voxel grid; then nnU-Net's own steps run (transpose,
nonzero crop, normalization, resampling) and the crop is composed into nnU-Net's ``bbox_used_for_cropping`` and
``shape_before_cropping``, so that nnU-Net's export pastes every prediction back into the full image by itself.
What the crop was is kept in the case's properties under ``nnunet_ape`` (source voxel boxes, x/y/z order).
"""

from __future__ import annotations

import numpy as np
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

from nnunet_ape.case_features import FeatureModels, case_features, load_feature_models
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
    ``device`` (an attribute) says where the APE/BPR models run. Models load once per process, on first use."""

    def __init__(self, verbose: bool = True):
        super().__init__(verbose)
        self.device = "cpu"
        self._models: FeatureModels | None = None
        self._models_for: dict | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_models"] = state["_models_for"] = None  # workers load their own
        return state

    def models(self, settings: APESettings) -> FeatureModels:
        """The localizer and APE/BPR models of ``settings``, loaded on first use (SHA-256 checked)."""
        args = settings.feature_model_args()
        if self._models is None or self._models_for != args:
            for kind in ("ape", "bpr"):
                path = settings.models.get(f"{kind}_checkpoint")
                if path and "localizer" not in settings.models and file_hash(path) != settings.models[f"{kind}_sha256"]:
                    raise InputError(f"{path}: not the checkpoint this configuration was planned with (SHA-256 differs); "
                                     f"plan it again with 'nnunet-ape plan ... --overwrite'")
            self._models = load_feature_models(**args, device=self.device)
            self._models_for = args
        return self._models

    def run_case_npy(self, data: np.ndarray, seg: np.ndarray | None, properties: dict, plans_manager,
                     configuration_manager, dataset_json: dict | str):
        """``data`` ``(C, Z, Y, X)``, ``seg`` ``(1, Z, Y, X)`` or None, as nnU-Net's reader gives them -> nnU-Net's
        preprocessed ``(data, seg, properties)`` of the crop (with the channels appended after the source's)."""
        settings = settings_of(configuration_manager.configuration)
        if settings is None:
            raise InputError("configuration has no 'nnunet_ape' settings; preprocess it with nnUNetv2_preprocess")
        ct = volume_from_nnunet(data[0], properties)
        features = case_features(self.models(settings), ct)
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
                seg = np.where(np.isin(seg, values), seg, 0).astype(seg.dtype)
            record["box_voxels"] = box.tolist()
        if features.channels is not None:
            added = np.ascontiguousarray(features.channels.transpose(3, 2, 1, 0))  # (n, Z, Y, X)
            data = np.concatenate([data.astype(np.float32, copy=False), added], axis=0)
        if box is not None:
            cut = (slice(None), *slices(box)[::-1])
            data = data[cut]
            seg = seg[cut] if seg is not None else None
        data, seg, properties = super().run_case_npy(data, seg, properties, plans_manager, configuration_manager, dataset_json)
        if box is not None:
            compose_crop(properties, box, full_shape, plans_manager.transpose_forward)
        properties["nnunet_ape"] = record
        return data, seg, properties
