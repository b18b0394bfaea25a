"""``nnunet-ape preprocess`` on a small synthetic dataset, in process and fast: several configurations together get
one read and one APE pass per case and the files separate runs write; a killed joint run resumes per
configuration. The APE model is an untrained tiny network and the localizer is fitted on it: boxes are arbitrary
but deterministic, which is all these tests need (training boxes grow to hold their labels)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_datasets import run_tool

DATASET = "Dataset777_Synth"
LABELS = {"background": 0, "liver": 1, "spleen": 2, "ignore": 3}
SHAPE = (48, 44, 36)  # x, y, z voxels
SPACING = (2.0, 2.0, 2.5)  # mm; the APE model's 4 x 4 x 5 mm grid makes the boxes' map stride 2
CROPS = ["3d_fullres_ape_liver", "3d_fullres_ape_spleen", "3d_fullres_ape_liver_ape"]


def _ellipsoid(center: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    """Boolean ``(X, Y, Z)`` mask of an ellipsoid (voxel units)."""
    grid = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1


def _write_case(raw: Path, case: str, seed: int) -> None:
    """A CT (HU: air, body, liver, spleen, noise) and its labels: liver 1, spleen 2, and the body's unlabeled
    voxels of two slices through both organs ignored (3), as sparse annotations have."""
    rng = np.random.default_rng(seed)
    shift = rng.integers(-3, 4, size=3)
    body = _ellipsoid((24, 22, 18), (21, 17, 40))
    liver = _ellipsoid(tuple(np.array([16, 20, 20]) + shift), (8, 7, 6))
    spleen = _ellipsoid(tuple(np.array([34, 24, 16]) + shift), (4, 4, 5)) & ~liver
    hu = np.where(body, 40.0, -1000.0) + np.where(liver, 30.0, 0) + np.where(spleen, 60.0, 0)
    hu = np.round(hu + rng.normal(0, 10, SHAPE))
    hu[hu == 0] = 1  # no zero voxels: nnU-Net's nonzero crop keeps every voxel (and marks none -1)
    label = np.where(liver, 1, np.where(spleen, 2, 0)).astype(np.uint8)
    label[:, :, 17:19][body[:, :, 17:19] & (label[:, :, 17:19] == 0)] = 3
    for array, folder, name in ((hu.astype(np.int16), "imagesTr", f"{case}_0000"), (label, "labelsTr", case)):
        image = sitk.GetImageFromArray(array.transpose(2, 1, 0))
        image.SetSpacing(SPACING)
        image.SetOrigin((-48.0, -40.0, 10.0))
        sitk.WriteImage(image, str(raw / folder / f"{name}.nii.gz"))


def _ape_checkpoint(path: Path) -> Path:
    """An untrained tiny APE network as a checkpoint of ``nnunet-ape pretrain``, embedding at 4 x 4 x 5 mm."""
    from nnunet_ape.checkpoint import APE_FORMAT, save_atomic
    from nnunet_ape.models.ape import PRESETS, APENet

    torch.manual_seed(0)
    model = APENet(PRESETS["tiny"])
    return save_atomic({"format": APE_FORMAT, "model_config": PRESETS["tiny"].to_dict(), "model": model.state_dict(),
                        "embed": {"spacing": [4.0, 4.0, 5.0], "patch_size": [32, 32, 32]}}, path)


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> dict:
    """The synthetic dataset planned by nnU-Net (fingerprint and plans), with crop configurations for the liver,
    the spleen and the liver with APE channels added by ``nnunet-ape plan``; returns its roots and environment."""
    return plan_dataset(tmp_path_factory.mktemp("preprocess"))


def plan_dataset(root: Path) -> dict:
    """The body of :func:`planned`, in ``root``."""
    import os

    from nnunet_ape.cli.main import main
    from nnunet_ape.cases import cases_from_nnunet
    from nnunet_ape.localize.fit import fit_localizer
    from nnunet_ape.localize.localizer import save_localizer

    roots = {k: root / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    raw = roots["nnUNet_raw"] / DATASET
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True)
    for seed, case in enumerate(("c0", "c1", "c2")):
        _write_case(raw, case, seed)
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 3,
                                                  "file_ending": ".nii.gz"}))
    env = {**os.environ, **{k: str(v) for k, v in roots.items()}, "nnUNet_def_n_proc": "1", "OMP_NUM_THREADS": "1"}
    run_tool(env, "preprocess", "python", "-c", "from nnunetv2.experiment_planning.plan_and_preprocess_api import *; "
             "extract_fingerprints([777], num_processes=1); plan_experiments([777])")  # one start of nnU-Net, not two
    checkpoint = _ape_checkpoint(root / "ape.pt")
    fitted = fit_localizer(cases_from_nnunet(str(raw)), {"liver": 1, "spleen": 2}, checkpoint, method="ape")
    localizer = save_localizer(fitted, root / "localizer.json")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_preprocessed", str(roots["nnUNet_preprocessed"]))
        assert main(["plan", "-d", "777", "-l", str(localizer)]) == 0
        assert main(["plan", "-d", "777", "-l", str(localizer), "--organs", "liver", "--channels", "ape"]) == 0
    return {"roots": roots, "env": env, "checkpoint": checkpoint, "localizer": localizer}


def _copy_preprocessed(planned: dict, target: Path) -> Path:
    """A fresh copy of the planned dataset's nnUNet_preprocessed folder (nothing preprocessed yet); returns it."""
    shutil.copytree(planned["roots"]["nnUNet_preprocessed"] / DATASET, target / DATASET)
    return target / DATASET


def _point_nnunet(mp: pytest.MonkeyPatch, raw_root: Path, preprocessed_root: Path) -> None:
    """Point nnU-Net's planner (run in process by the crop re-plan) and our commands at ``raw_root`` and
    ``preprocessed_root``."""
    from nnunetv2.experiment_planning.experiment_planners import default_experiment_planner

    for name, value in (("nnUNet_raw", raw_root), ("nnUNet_preprocessed", preprocessed_root)):
        mp.setenv(name, str(value))
        mp.setattr(default_experiment_planner, name, str(value))


def _count_network_passes(mp: pytest.MonkeyPatch) -> list:
    """Record every APE network pass over a CT (the expensive half of an embedding) in the returned list, one
    entry per pass; preprocessing runs on one thread (the cores are shared)."""
    from nnunet_ape import case_features as features_module
    from nnunet_ape.nnunet import preprocess_runner

    mp.setattr(preprocess_runner, "threads_per_process", lambda *a, **k: 1)
    passes = []
    network = features_module.network_map
    mp.setattr(features_module, "network_map", lambda model, ct, *a, **k: passes.append(1) or network(model, ct, *a, **k))
    return passes


@pytest.fixture(scope="module")
def joint(planned, tmp_path_factory) -> tuple[Path, list]:
    """The crop configurations preprocessed together (one ``preprocess -c A B C``); returns the dataset's
    nnUNet_preprocessed folder and the network passes it took."""
    preprocessed = _copy_preprocessed(planned, tmp_path_factory.mktemp("joint"))
    with pytest.MonkeyPatch.context() as mp:
        _point_nnunet(mp, planned["roots"]["nnUNet_raw"], preprocessed.parent)
        passes = _count_network_passes(mp)
        _run(preprocessed, planned, CROPS)
    return preprocessed, passes


def _run(preprocessed: Path, planned: dict, configurations: list[str]) -> list[dict]:
    from nnunet_ape.nnunet.preprocess_runner import PreprocessJob, preprocess_configurations

    raw = planned["roots"]["nnUNet_raw"] / DATASET
    return preprocess_configurations([PreprocessJob(preprocessed, raw, "nnUNetPlans", c, 1, "cpu") for c in configurations])


def _same(a, b) -> bool:
    """Deep equality of nnU-Net's case properties (dicts, lists, tuples, numpy arrays)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def _outputs(preprocessed: Path, configuration: str) -> dict:
    """What preprocessing wrote for ``configuration``: per case its data, seg and properties; its summary; its plans."""
    import blosc2
    from batchgenerators.utilities.file_and_folder_operations import load_pickle

    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    folder = preprocessed / f"nnUNetPlans_{configuration}"
    cases = {}
    for pkl in sorted(folder.glob("*.pkl")):
        case = pkl.stem
        cases[case] = {"data": blosc2.open(urlpath=str(folder / f"{case}.b2nd"), mode="r")[:],
                       "seg": blosc2.open(urlpath=str(folder / f"{case}_seg.b2nd"), mode="r")[:],
                       "properties": load_pickle(str(pkl))}
    summary = json.loads((preprocessed / "nnunet_ape" / f"nnUNetPlans_{configuration}.crops.json").read_text())
    return {"cases": cases, "summary": summary, "plans": plans["configurations"][configuration]}


def test_configurations_together_get_one_ape_pass_per_case_and_the_files_of_separate_runs(planned, joint, monkeypatch, tmp_path):
    together, passes = joint
    assert len(passes) == 3  # three cases, three configurations: one network map per case (boxes on it, channels from it)
    separate = _copy_preprocessed(planned, tmp_path)
    _point_nnunet(monkeypatch, planned["roots"]["nnUNet_raw"], separate.parent)
    passes = _count_network_passes(monkeypatch)
    for configuration in CROPS:
        _run(separate, planned, [configuration])
    assert len(passes) == 9
    for configuration in CROPS:
        outputs = _outputs(together, configuration)
        assert sorted(outputs["cases"]) == ["c0", "c1", "c2"]
        assert _same(outputs, _outputs(separate, configuration)), configuration
    liver, spleen = (_outputs(together, c)["cases"]["c0"]["properties"]["nnunet_ape"]["box_voxels"] for c in CROPS[:2])
    assert liver != spleen  # each organ group its own box, from the one pass
    assert _outputs(together, CROPS[2])["cases"]["c0"]["data"].shape[0] == 4  # CT + 3 APE channels


def test_a_killed_joint_run_resumes_each_configuration_where_it_stopped(planned, joint, monkeypatch, tmp_path):
    shutil.copytree(joint[0], tmp_path / DATASET)
    preprocessed = tmp_path / DATASET
    _point_nnunet(monkeypatch, planned["roots"]["nnUNet_raw"], tmp_path)
    before = {c: _outputs(preprocessed, c) for c in CROPS}
    # killed while writing c1 of the spleen configuration: its arrays are written, its .pkl (written last) is not
    (preprocessed / f"nnUNetPlans_{CROPS[1]}" / "c1.pkl").unlink()
    written = {c: (preprocessed / f"nnUNetPlans_{c}" / "c0.pkl").stat().st_mtime_ns for c in CROPS}
    passes = _count_network_passes(monkeypatch)
    _run(preprocessed, planned, CROPS)
    assert len(passes) == 1  # c1 only, once
    assert written == {c: (preprocessed / f"nnUNetPlans_{c}" / "c0.pkl").stat().st_mtime_ns for c in CROPS}
    for c in CROPS:
        assert _same(_outputs(preprocessed, c), before[c]), c


def test_crops_keep_the_ignore_label(planned, joint):
    """Sparse annotations: the ignore label's voxels in a crop stay ignored (nnU-Net leaves them out of the loss);
    only the other organs' labels become background."""
    preprocessed, _ = joint
    raw = planned["roots"]["nnUNet_raw"] / DATASET
    for configuration, organ in ((CROPS[0], 1), (CROPS[1], 2)):
        for case, entry in _outputs(preprocessed, configuration)["cases"].items():
            box = np.asarray(entry["properties"]["nnunet_ape"]["box_voxels"])
            source = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / f"{case}.nii.gz"))).transpose(2, 1, 0)
            inside = source[tuple(slice(a, b) for a, b in zip(*box))]
            assert (inside == 3).any()
            assert set(np.unique(entry["seg"])) == {0, organ, 3}, (configuration, case)
            assert np.count_nonzero(entry["seg"] == 3) == np.count_nonzero(inside == 3)  # the same grid: no resampling

def test_preprocess_default_processes_is_bounded(monkeypatch):
    from nnunet_ape.nnunet import preprocess_runner

    monkeypatch.setattr(preprocess_runner, "available_cores", lambda: 16)
    assert preprocess_runner.default_num_processes("cpu") == 4
    assert preprocess_runner.default_num_processes("cuda:0") == 2
    monkeypatch.setattr(preprocess_runner, "available_cores", lambda: 1)
    assert preprocess_runner.default_num_processes("cpu") == 1


def test_gpu_processes_are_bounded_by_free_memory_and_at_most_two():
    """Issue 29, item 8: every process on the GPU holds its own CUDA context, models and a case's temporaries."""
    from nnunet_ape.gpu_processes import free_gpu_memory, gpu_processes

    gib = 1 << 30
    assert gpu_processes(8, 22 * gib, 4 * gib) == 2  # a 24 GB card: the cap
    assert gpu_processes(8, 6 * gib, 4 * gib) == 1  # a busy or small card
    assert gpu_processes(8, 1 * gib, 4 * gib) == 1  # never none: one process may still fit a small CT
    assert gpu_processes(8, 40 * gib, 4 * gib, most=4) == 4 and gpu_processes(3, 40 * gib, 4 * gib, most=8) == 3
    assert gpu_processes(8, None) == 2  # free memory unknown: the cap
    free = free_gpu_memory("cuda")  # read in a child process; None without CUDA
    assert free is None or free > 0


def test_preprocess_lowers_gpu_processes_with_one_line(monkeypatch):
    from nnunet_ape.nnunet import preprocess_runner

    monkeypatch.setattr(preprocess_runner, "available_cores", lambda: 16)
    asked = []
    monkeypatch.setattr(preprocess_runner, "free_gpu_memory", lambda device: asked.append(device) or 22 << 30)
    processes, note = preprocess_runner.num_processes("cuda:1", 8)
    assert processes == 2 and asked == ["cuda:1"]
    assert "-np 8" in note and "running 2" in note and "\n" not in note
    assert preprocess_runner.num_processes("cuda:1", None) == (2, None)  # the default: no note
    monkeypatch.setattr(preprocess_runner, "free_gpu_memory", lambda device: 5 << 30)
    assert preprocess_runner.num_processes("cuda", None) == (1, None)
    assert preprocess_runner.num_processes("cuda", 2)[0] == 1
    assert preprocess_runner.num_processes("cpu", 8) == (8, None)  # CPU processes are the user's choice
    monkeypatch.setattr(preprocess_runner, "free_gpu_memory", lambda device: pytest.fail("queried for one process"))
    assert preprocess_runner.num_processes("cuda", 1) == (1, None)  # nothing to bound: no query (it takes seconds)


def _ape_entry(plans: dict, plans_identifier: str, base: str, name: str) -> None:
    """Add a liver crop configuration on ``base`` to ``plans`` (in place)."""
    from nnunet_ape.nnunet.ape_plans import APESettings, ape_configuration

    settings = APESettings(base, ["liver"], {"liver": 1}, [], 10.0, {"localizer": "/x/loc.json", "localizer_sha256": "a"})
    plans["configurations"][name] = ape_configuration(plans, plans_identifier, name, settings)


def test_2d_crops_are_planned_for_the_slices_median_shape(planned, monkeypatch, tmp_path):
    """nnU-Net plans 2d for the median's in-plane shape (its last two axes); a crop tall in z and small in-plane
    gets a small in-plane patch, not one clamped by its number of slices."""
    from nnunet_ape.nnunet.ape_plans import plan_for_crops

    preprocessed = _copy_preprocessed(planned, tmp_path)
    _point_nnunet(monkeypatch, planned["roots"]["nnUNet_raw"], tmp_path)
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    _ape_entry(plans, "nnUNetPlans", "2d", "2d_ape_liver")
    (preprocessed / "nnUNetPlans.json").write_text(json.dumps(plans))
    update = plan_for_crops(preprocessed, "nnUNetPlans", "2d_ape_liver", [[36, 20, 16]] * 3)
    assert update["median_image_size_in_voxels"] == [20.0, 16.0]
    assert len(update["patch_size"]) == 2 and update["patch_size"][0] <= 24 and update["patch_size"][1] <= 16


def _large_planned_dataset(root: Path, plans_identifier: str, target_gb: float) -> Path:
    """A dataset of 300 CTs of 160 x 256 x 256 voxels, as far as nnU-Net's planner sees it (dataset.json and
    fingerprint; no images), its 3d_fullres planned by nnU-Net's default planner for ``target_gb`` and a liver crop
    configuration added; returns its nnUNet_preprocessed folder (nnU-Net's paths must point at ``root``)."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    raw, preprocessed = root / "raw" / "Dataset778_Large", root / "pre" / "Dataset778_Large"
    for folder in (raw / "imagesTr", preprocessed):
        folder.mkdir(parents=True)
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "numTraining": 300, "file_ending": ".nii.gz"}
    (raw / "dataset.json").write_text(json.dumps(dataset))
    (preprocessed / "dataset.json").write_text(json.dumps(dataset))
    (preprocessed / "dataset_fingerprint.json").write_text(json.dumps({"median_relative_size_after_cropping": 1.0}))
    planner = ExperimentPlanner("Dataset778_Large", gpu_memory_target_in_gb=target_gb, plans_name=plans_identifier)
    median = np.array([160.0, 256.0, 256.0])
    fullres = planner.get_plans_for_configuration(np.ones(3), median, f"{plans_identifier}_3d_fullres", float(np.prod(median) * 300), {})
    plans = {"dataset_name": "Dataset778_Large", "plans_name": plans_identifier, "experiment_planner_used": "ExperimentPlanner",
             "configurations": {"3d_fullres": fullres}}
    recursive_fix_for_json_export(plans)
    _ape_entry(plans, plans_identifier, "3d_fullres", "3d_fullres_ape_liver")
    (preprocessed / f"{plans_identifier}.json").write_text(json.dumps(plans))
    return preprocessed


@pytest.mark.parametrize("plans_identifier", ["nnUNetPlans_24G", "nnUNetPlans_large"])
def test_crops_are_planned_for_the_gpu_memory_target_of_the_plans_they_extend(plans_identifier, monkeypatch, tmp_path):
    """Plans made with -gpu_memory_target 24 (nnU-Net keeps no record of it): the crops are planned for 24 GB, not
    for the planner's default 8 GB: found from the plans name, or from the base configuration's stored patch and
    batch size."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    from nnunet_ape.nnunet.ape_plans import plan_for_crops

    _point_nnunet(monkeypatch, tmp_path / "raw", tmp_path / "pre")
    preprocessed = _large_planned_dataset(tmp_path, plans_identifier, 24)
    crops = [[96, 160, 160]] * 300
    update = plan_for_crops(preprocessed, plans_identifier, "3d_fullres_ape_liver", crops)
    crop_plan = json.loads((preprocessed / f"{plans_identifier}.json").read_text())["configurations"]["3d_fullres_ape_liver"]["nnunet_ape"]["crop_plan"]
    planner = ExperimentPlanner("Dataset778_Large", plans_name=plans_identifier)
    cache: dict = {}
    base = json.loads((preprocessed / f"{plans_identifier}.json").read_text())["configurations"]["3d_fullres"]

    def plan(target: float, median, data_identifier: str) -> tuple:
        planner.UNet_vram_target_GB = target
        p = planner.get_plans_for_configuration(np.ones(3), np.asarray(median, dtype=float), data_identifier,
                                                float(np.prod(median) * 300), cache)
        return [int(i) for i in p["patch_size"]], int(p["batch_size"])

    assert plan(8, crops[0], "x") != plan(24, crops[0], "x")  # the target matters for these crops
    assert (update["patch_size"], update["batch_size"]) == plan(24, crops[0], "x")
    target = crop_plan["gpu_memory_target_gb"]
    assert target == 24 and plan(target, base["median_image_size_in_voxels"], "y") == (base["patch_size"], base["batch_size"])
    how = "the plans name" if plans_identifier.endswith("_24G") else "derived"  # else the nearest common GPU size
    assert crop_plan["gpu_memory_target_from"].startswith(how)
