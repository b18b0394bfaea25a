"""One model on one box of a CT through nnU-Net's own steps: cut the box from the source channels (and the added
embedding channels), nnU-Net's preprocessing, sliding-window prediction (its tiles, Gaussian blending, mirroring,
fold averaging), resampling back onto the box's voxels. Then which faces of the box the predicted organs touch.

Arrays here are in nnU-Net's layout ``(C, Z, Y, X)`` (as its SimpleITK reader gives them); boxes are crop boxes in
the CT's x/y/z voxel indices (:mod:`nnunet_ape.crop_geometry`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nnunet_ape.crop_geometry import slices
from nnunet_ape.io import Volume
from nnunet_ape.nnunet.preprocessor import SourceChannelsPreprocessor, round_added_channels
from nnunet_ape.nnunet.trained_model import TrainedModel


@dataclass
class RegionPrediction:
    """A model's result on a box: ``labels`` ``(X, Y, Z)`` output label values (0 = background or a label the
    model does not own); ``confidence`` ``(X, Y, Z)`` float32, the probability of the predicted label (0 where
    background; None when predicted through nnU-Net's argmax path); ``probabilities`` ``{output value: (X, Y, Z) float32}`` when asked for."""

    labels: np.ndarray
    confidence: np.ndarray | None
    probabilities: dict[int, np.ndarray] | None = None


def network_input(channels: list[Volume], added: np.ndarray | None, box: np.ndarray) -> tuple[np.ndarray, dict]:
    """The box of the source channels (Volumes ``(X, Y, Z)`` on one grid) and of the added channels ``(X, Y, Z, n)``
    -> ``(data (C, Z, Y, X) float32, properties {'spacing': (sz, sy, sx)})`` as nnU-Net's reader would give the crop."""
    cut = slices(box)
    parts = [v.array[cut].astype(np.float32).transpose(2, 1, 0)[None] for v in channels]
    if added is not None:
        parts.append(added[cut].astype(np.float32).transpose(3, 2, 1, 0))
    return np.ascontiguousarray(np.concatenate(parts, axis=0)), {"spacing": [float(s) for s in channels[0].spacing[::-1]]}


@torch.inference_mode()
def predict_region(model: TrainedModel, channels: list[Volume], added: np.ndarray | None, box: np.ndarray,
                   keep_probabilities: bool = False, confidence: bool = True) -> RegionPrediction:
    """Run ``model`` on ``box`` of a CT (``channels``: its source channels; ``added``: the embedding channels of
    the whole CT ``(X, Y, Z, n)`` or None) and return its labels mapped to output values, on the box's voxels.

    ``confidence`` False (and no ``keep_probabilities``): nnU-Net's argmax path
    (``convert_predicted_logits_to_segmentation_with_correct_shape(return_probabilities=False)``, as
    ``nnUNetv2_predict`` without ``--save_probabilities``): no softmax, no ``(C, Z, Y, X)`` float32 probabilities of
    the box, and ``confidence`` of the result is None. The labels are those of the probability path (the argmax of
    the logits is the argmax of their softmax)."""
    from nnunetv2.inference import export_prediction

    predictor = model.predictor
    data, properties = network_input(channels, added, box)
    data, _, properties = SourceChannelsPreprocessor(verbose=False).run_case_npy(
        data, None, properties, predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json)
    data = round_added_channels(data, data.shape[0] - model.source_channels, model.channel_precision)  # as in training
    logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
    del data
    probabilities_wanted = confidence or keep_probabilities
    converted = export_prediction.convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager, properties,
        return_probabilities=probabilities_wanted)
    del logits
    segmentation, probabilities = converted if probabilities_wanted else (converted, None)
    del converted
    segmentation = np.asarray(segmentation).transpose(2, 1, 0)  # (Z, Y, X) -> (X, Y, Z)
    labels = np.zeros(segmentation.shape, dtype=np.uint16)
    certainty = np.zeros(segmentation.shape, dtype=np.float32) if probabilities_wanted else None
    kept = {}
    for channel, value in enumerate(predictor.label_manager.all_labels):
        if value not in model.to_output:
            continue
        out = model.to_output[value]
        here = segmentation == value
        labels[here] = out
        if probabilities is None:
            continue
        probability = probabilities[channel].transpose(2, 1, 0)
        certainty[here] = probability[here]
        if keep_probabilities:
            kept[out] = np.ascontiguousarray(probability, dtype=np.float32)
    return RegionPrediction(labels, certainty, kept if keep_probabilities else None)


def touched_faces(mask: np.ndarray, box: np.ndarray, shape: tuple[int, int, int]) -> list[tuple[int, int]]:
    """Faces of a crop box that the True voxels of ``mask`` (the box's voxels, ``(X, Y, Z)``) touch and that are
    not the image border: ``(axis, side)`` pairs with side 0 = low face, 1 = high face."""
    faces = []
    for axis in range(3):
        if box[0][axis] > 0 and np.take(mask, 0, axis=axis).any():
            faces.append((axis, 0))
        if box[1][axis] < shape[axis] and np.take(mask, -1, axis=axis).any():
            faces.append((axis, 1))
    return faces


def grow_faces(box: np.ndarray, faces: list[tuple[int, int]], grow_mm: float, fraction: float,
               spacing: tuple[float, float, float], shape: tuple[int, int, int]) -> np.ndarray:
    """``box`` with each of ``faces`` moved outwards by ``max(grow_mm, fraction x the box's extent)`` along its
    axis (whole voxels, at least one), clipped to the image."""
    grown = np.array(box, dtype=np.int64)
    for axis, side in faces:
        extent_mm = (box[1][axis] - box[0][axis]) * spacing[axis]
        step = max(1, int(np.ceil(max(grow_mm, fraction * extent_mm) / spacing[axis])))
        if side == 0:
            grown[0][axis] = max(0, grown[0][axis] - step)
        else:
            grown[1][axis] = min(shape[axis], grown[1][axis] + step)
    return grown
