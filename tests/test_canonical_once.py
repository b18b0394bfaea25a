"""One canonical CT per case (issue 32, item 3): the predict, crop-dataset, preprocess and localize paths bring each
CT into canonical order once (:func:`nnunet_ape.canonical.canonical_ct`) and carry it; the APE map stays canonical
until output. Counted on phantoms with untrained tiny APE and BPR models (the counts, not the boxes, are tested;
tests/test_crop_dataset.py, test_nnunet_trainers.py and test_localize_*.py check the boxes and channels)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_ape import io
from nnunet_ape.canonical import CanonicalCT, canonical_ct
from nnunet_ape.cases import LabeledCase
from nnunet_ape.embed import CanonicalMap, EmbedSettings, NetworkMap, canonical_map, map_on_grid
from nnunet_ape.io import Volume, read_volume, to_canonical

ORGANS = {"liver": 1, "spleen": 2}
SETTINGS = {"spacing": [3.0, 3.0, 4.0], "patch_size": [64, 64, 48]}  # coarse: the counts need no detail


def _oriented(image: sitk.Image, how: str) -> sitk.Image:
    """The same patient in another index order: axes permuted and/or flipped, an odd crop (strided maps then start
    elsewhere on flipped axes). Physical geometry is kept."""
    if how == "permflip":
        return sitk.PermuteAxes(sitk.Flip(image[1:, :-2, 3:], [False, True, True]), [1, 2, 0])
    if how == "perm":
        return sitk.PermuteAxes(image, [2, 0, 1])
    return image


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, Path]:
    """Phantom CTs and labels (liver 1, spleen 2) in three index orders, and untrained tiny APE/BPR checkpoints."""
    from nnunet_ape.bpr.train_bpr import BPR_FORMAT
    from nnunet_ape.checkpoint import APE_FORMAT
    from nnunet_ape.models.ape import PRESETS, APENet
    from nnunet_ape.models.bpr import BPRNet
    from nnunet_ape.phantoms import make_phantom

    root = tmp_path_factory.mktemp("canonical")
    paths = {}
    for seed, how in ((1, "plain"), (2, "perm"), (3, "permflip")):
        ct, seg = make_phantom(seed)
        labels = sitk.GetArrayFromImage(seg)
        kept = sitk.GetImageFromArray(np.where(np.isin(labels, (1, 2)), labels, 0).astype(np.uint8))
        kept.CopyInformation(seg)
        name = f"phantom{seed:03d}"
        sitk.WriteImage(_oriented(ct, how), str(root / f"{name}_0000.nii.gz"))
        sitk.WriteImage(_oriented(kept, how), str(root / f"{name}.nii.gz"))
        paths[name] = root / f"{name}_0000.nii.gz"
    torch.manual_seed(0)
    config = PRESETS["tiny"]
    torch.save({"format": APE_FORMAT, "model_config": config.to_dict(), "model": APENet(config).state_dict(),
                "embed": SETTINGS}, root / "ape.pt")
    torch.save({"format": BPR_FORMAT, "model_config": {"trunk": "tiny"}, "model": BPRNet("tiny").state_dict()},
               root / "bpr.pt")
    paths.update(ape=root / "ape.pt", bpr=root / "bpr.pt", root=root)
    return paths


@pytest.fixture(scope="module")
def localizer(phantoms) -> Path:
    """An APE (label transfer) + BPR localizer fitted on phantoms 1 and 2."""
    from nnunet_ape.localize.fit import fit_localizer
    from nnunet_ape.localize.localizer import save_localizer

    shots = [LabeledCase(n, phantoms[n], phantoms["root"] / f"{n}.nii.gz", dict(ORGANS)) for n in ("phantom001", "phantom002")]
    fitted = fit_localizer(shots, ORGANS, phantoms["ape"], bpr_checkpoint=phantoms["bpr"], ape_boxes="all-voxels")
    return save_localizer(fitted, phantoms["root"] / "localizer.json")


def _count_to_canonical(monkeypatch) -> list:
    """Count every :func:`nnunet_ape.io.to_canonical` from here on, wherever the package imported it: one entry (the
    volume's shape) per call."""
    import nnunet_ape.case_features  # noqa: F401  (everything on the paths below, imported before patching)
    import nnunet_ape.cli.main  # noqa: F401
    import nnunet_ape.nnunet.crop_dataset  # noqa: F401
    import nnunet_ape.nnunet.localized_predict  # noqa: F401

    calls: list = []
    original = io.to_canonical

    def counted(volume):
        calls.append(volume.shape)
        return original(volume)

    for name, module in list(sys.modules.items()):
        if name.startswith("nnunet_ape") and getattr(module, "to_canonical", None) is original:
            monkeypatch.setattr(module, "to_canonical", counted)
    return calls


@dataclass
class _StubModel:
    """What :class:`~nnunet_ape.nnunet.localized_predict.LocalizedPredictor` reads of a trained model; its
    prediction is replaced (no nnU-Net network here)."""

    name: str
    kind: str
    organs: list[str]
    feature_args: dict | None
    added_channels: tuple[str, ...] = ()
    to_output: dict[int, int] = field(default_factory=lambda: {1: 1, 2: 2})
    output_labels: dict[str, int] = field(default_factory=lambda: {"background": 0, **ORGANS})
    source_channels: int = 1
    file_ending: str = ".nii.gz"

    @property
    def crops(self) -> bool:
        return self.kind in ("crop", "crop+channels")


def test_predict_canonicalizes_each_ct_once(phantoms, localizer, monkeypatch):
    from nnunet_ape.nnunet import localized_predict
    from nnunet_ape.nnunet.region_prediction import RegionPrediction

    def predicted(model, channels, added, box, keep_probabilities=False, confidence=True):  # an empty prediction on the box
        shape = tuple(int(b - a) for a, b in zip(*box))
        return RegionPrediction(np.zeros(shape, np.uint16), np.zeros(shape, np.float32) if confidence else None,
                                {} if keep_probabilities else None)

    monkeypatch.setattr(localized_predict, "predict_region", predicted)
    crop = _StubModel("crop", "crop", ["liver"], {"localizer_path": localizer, "organs": ["liver"], "channels": ()})
    spleen = _StubModel("crop_channels", "crop+channels", ["spleen"],
                        {"localizer_path": localizer, "organs": ["spleen"], "channels": ("ape", "bpr")}, ("ape", "bpr"))
    whole = _StubModel("channels", "channels", list(ORGANS),
                       {"localizer_path": None, "organs": None, "channels": ("ape",), "ape_path": phantoms["ape"]}, ("ape",))
    predictor = localized_predict.LocalizedPredictor([crop, spleen, whole], "cpu")
    calls = _count_to_canonical(monkeypatch)
    for n, name in enumerate(("phantom003", "phantom002"), start=1):
        result = predictor.predict_case([read_volume(phantoms[name])])
        assert len(calls) == n, calls
        assert [m.get("skipped") for m in result.report["models"]] == [None] * 3


def test_crop_dataset_canonicalizes_each_ct_once(phantoms, localizer, tmp_path, monkeypatch):
    from nnunet_ape.cli import main

    raw = tmp_path / "nnUNet_raw"
    source = raw / "Dataset701_Phantoms"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (source / sub).mkdir(parents=True)
    for name, split in (("phantom001", "Tr"), ("phantom002", "Tr"), ("phantom003", "Ts")):
        (source / f"images{split}" / f"{name}_0000.nii.gz").symlink_to(phantoms[name])
        if split == "Tr":
            (source / "labelsTr" / f"{name}.nii.gz").symlink_to(phantoms["root"] / f"{name}.nii.gz")
    (source / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, **ORGANS},
                                                      "numTraining": 2, "file_ending": ".nii.gz"}))
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / key).mkdir(exist_ok=True)
        monkeypatch.setenv(key, str(tmp_path / key))
    calls = _count_to_canonical(monkeypatch)
    assert main(["crop-dataset", "-d", "701", "-l", str(localizer), "--organs", "liver", "-o", "702",
                 "--channels", "ape", "bpr", "--device", "cpu"]) == 0
    assert len(calls) == 3, calls  # three cases
    assert len(list((raw / "Dataset702_PhantomsLiverCrop" / "imagesTr").glob("*_0002.nii.gz"))) == 2  # CT, APE x/y/z, BPR


def test_joint_preprocess_canonicalizes_each_ct_once(phantoms, localizer, monkeypatch):
    from nnunet_ape.case_features import case_features_many, load_feature_models

    models = [load_feature_models(localizer, ["liver"], ()), load_feature_models(localizer, ["spleen"], ("ape",)),
              load_feature_models(None, None, ("ape", "bpr"), phantoms["ape"], phantoms["bpr"])]
    ct = read_volume(phantoms["phantom003"])
    calls = _count_to_canonical(monkeypatch)
    case_features_many(models, ct)  # preprocess -c A B C: one call for all configurations of a case
    assert len(calls) == 1


def test_localize_predict_canonicalizes_each_ct_once(phantoms, localizer, tmp_path, monkeypatch):
    from nnunet_ape.cli import main

    images = tmp_path / "images"
    images.mkdir()
    for name in ("phantom002", "phantom003"):
        (images / f"{name}_0000.nii.gz").symlink_to(phantoms[name])
    calls = _count_to_canonical(monkeypatch)
    assert main(["localize", "predict", "-l", str(localizer), "-i", str(images), "-o", str(tmp_path / "boxes"), "--png",
                 "--device", "cpu"]) == 0
    assert len(calls) == 2, calls  # two cases, localized and drawn
    assert (tmp_path / "boxes" / "phantom003_boxes.png").is_file()


@pytest.mark.parametrize("how", ["plain", "perm", "permflip"])
@pytest.mark.parametrize("stride", [1, 3, 4])
def test_canonical_map_is_the_map_on_the_ct_grid_made_canonical(phantoms, how, stride):
    """The canonical map (what localization searches) holds the same voxels, with the same geometry, as the map on
    the CT's own grid brought into canonical order (the old round trip); boxes and arrays go back exactly."""
    name = {"plain": "phantom001", "perm": "phantom002", "permflip": "phantom003"}[how]
    ct = canonical_ct(read_volume(phantoms[name]))
    generator = torch.Generator().manual_seed(0)
    network = NetworkMap(torch.randn((3, *(max(2, n // 2) for n in ct.canon.shape)), generator=generator), ct)
    settings = EmbedSettings(spacing=tuple(2 * s for s in ct.canon.spacing), stride=stride)
    on_grid = map_on_grid(network, settings)
    canonical = canonical_map(network, settings)
    expected = to_canonical(on_grid)[0]
    assert canonical.stride == stride and canonical.source_shape == on_grid.shape
    assert np.array_equal(canonical.volume.array, expected.array) and canonical.volume.array.flags.c_contiguous
    assert canonical.volume.same_geometry(expected, atol=1e-6)
    back = canonical.on_source_grid()
    assert np.array_equal(back.array, on_grid.array) and back.same_geometry(on_grid, atol=0)
    from_grid = CanonicalMap.from_source_grid(on_grid, ct)
    assert from_grid.stride == stride and np.array_equal(from_grid.volume.array, canonical.volume.array)
    # the CT voxel under each map voxel: canonical start + stride * j
    index = np.array([1, 2, 1])
    assert np.allclose(canonical.volume.index_to_physical(index),
                       ct.canon.index_to_physical(np.asarray(canonical.start) + stride * index), atol=1e-6)
    box = np.array([[1.5, 0.0, 2.0], [7.0, 5.25, 9.0]])
    assert np.allclose(ct.box_to_canonical(ct.box_to_source(box)), box)
    label = np.arange(np.prod(ct.source.shape)).reshape(ct.source.shape)
    assert np.array_equal(ct.array_to_canonical(label), to_canonical(ct.source.with_array(label))[0].array)
    assert np.array_equal(ct.array_to_source(ct.array_to_canonical(label)), label)
    assert canonical_ct(ct) is ct and isinstance(ct, CanonicalCT)


def test_crop_boxes_come_from_the_map_at_the_model_spacing(phantoms, monkeypatch):
    """Issue 29, item 8: a crop configuration's boxes come from the network's map on the model's grid, with no map
    on every CT voxel (GBs for a 512x512x300 CT); a configuration with APE channels resamples the map onto every
    voxel for its channels only, so both get the same boxes, from one network pass."""
    from nnunet_ape import case_features as module
    from nnunet_ape.case_features import FeatureModels, case_features_many
    from nnunet_ape.checkpoint import load_ape_model
    from nnunet_ape.embed import stored_settings

    ape, state = load_ape_model(phantoms["ape"])
    edges = (np.random.default_rng(0).standard_normal((6, 3)) * 0.1).tolist()
    localizer = {"organs": {"liver": {"label": 1, "alpha": 1.0, "shots": [{"edge_embeddings": edges}]}}, "combine": "mean"}
    crops, with_channels = (FeatureModels(localizer, ["liver"], channels, ape, None, stored_settings(state), None, "cpu",
                                          phantoms["ape"]) for channels in ((), ("ape",)))
    ct = read_volume(phantoms["phantom003"])
    resampled, networks = [], []
    real_resample, real_network = module.canonical_map, module.network_map
    monkeypatch.setattr(module, "canonical_map", lambda *a, **k: resampled.append(1) or real_resample(*a, **k))
    monkeypatch.setattr(module, "network_map", lambda *a, **k: networks.append(1) or real_network(*a, **k))
    alone = case_features_many([crops], ct)[0]
    assert resampled == [] and networks == [1] and alone.channels is None
    both = case_features_many([crops, with_channels], ct)
    assert resampled == [1] and networks == [1, 1]
    assert np.array_equal(both[0].crop_box, alone.crop_box) and np.array_equal(both[1].crop_box, alone.crop_box)
    assert both[1].channels.shape == (*ct.shape, 3)
