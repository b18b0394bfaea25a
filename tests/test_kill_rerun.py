"""Crash safety of every data-set-level command: SIGKILL it at a seeded random point of its writing, rerun it, and
the result is what an uninterrupted run writes (images, labels and nnU-Net's files byte for byte; JSON up to
timestamps and timings), with nothing left that nnU-Net or a glob takes for data, in between or after.

The commands run on six small crops of real head-and-neck CT (../shared/data/Dataset901_HeadNeckCT) through the
harness of ``kill_harness.py``; the default run kills each command once, ``-m slow`` at four more points. Each kill
prints one line (and, with ``$NNUNET_APE_KILL_REPORT``, appends it to that JSON-lines file): where it was killed
and what held.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk

from conftest import announced, say
from kill_harness import Command, Harness, compare
from nnunet_datasets import HEADNECK, tiny_plans, write_headneck_source

TRAIN = ("hn_001", "hn_002", "hn_004", "hn_007")
TEST = ("hn_003", "hn_005")
SOURCE = "Dataset950_KillSource"
ORGAN = "parotid_left"
SEEDS_DEFAULT = (5,)  # u = 0.64: mid-run
SEEDS_SLOW = (1, 3, 9, 0)  # u = 0.29, 0.37, 0.52, 0.79

pytestmark = pytest.mark.skipif(not HEADNECK.exists(), reason="head-and-neck dataset not available")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    base = tmp_path_factory.mktemp("kill")
    report = os.environ.get("NNUNET_APE_KILL_REPORT")
    h = Harness(base, Path(report) if report else None)
    yield h
    h.zygote.close()


@pytest.fixture(scope="module")
def assets(harness, pretrained_run, bpr_run) -> dict[str, Path]:
    with announced("kill harness: source dataset, localizer, nnU-Net plans, crop dataset and model"):
        return build_assets(harness, pretrained_run / "checkpoint_final.pt", bpr_run / "checkpoint_final.pt")


def build_assets(harness: Harness, ape: Path, bpr: Path) -> dict[str, Path]:
    """What the commands read, made once: the source dataset, a body-box localizer, checkpoints, nnU-Net's plans
    with an APE crop configuration, a crop dataset, a crop model with random weights and its predictions."""
    from nnunet_ape.cases import cases_from_nnunet
    from nnunet_ape.localize.fit import fit_localizer
    from nnunet_ape.localize.localizer import save_localizer

    base = harness.base / "assets"
    out = {"ape": ape, "bpr": bpr}
    if True:
        out["source"] = write_headneck_source(base / SOURCE, TRAIN, TEST)
        shots = cases_from_nnunet(str(out["source"]))
        out["localizer"] = save_localizer(fit_localizer(shots, {ORGAN: 4}, None), base / "localizer.json")
        ws = harness.zygote.use(base / "ws")
        (ws / "raw" / SOURCE).symlink_to(out["source"])
        harness.zygote.call("kill_harness:plan_dataset", ["950"], ws / "logs" / "plan.log")
        _main(harness, ws, "plan", "-d", "950", "-l", out["localizer"], "--organs", ORGAN)
        out["preprocessed"] = ws / "pre" / SOURCE
        _main(harness, ws, "crop-dataset", "-d", "950", "-l", out["localizer"], "--organs", ORGAN, "-o", "953", "--device", "cpu")
        out["crops"] = next((ws / "raw").glob("Dataset953_*"))
        out["results"] = _crop_model(ws, out["crops"])
        out["crop_predictions"] = _crop_predictions(out["crops"], base / "crop_predictions")
        (ws / "logs" / "plan.log").unlink()
    return out


def _main(harness: Harness, ws: Path, *args) -> None:
    log = ws / "logs" / f"{args[0]}.log"
    rc = harness.zygote.wait(harness.zygote.start([str(a) for a in args], log))
    assert rc == 0, log.read_text()[-3000:]


def _crop_model(ws: Path, crops: Path) -> Path:
    """``nnUNet_results/<crop dataset>/nnUNetTrainer__nnUNetPlans__3d_fullres`` as training would leave it, with a
    tiny network of seeded random weights (what it predicts does not matter here, only that it is deterministic)."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    folder = ws / "res" / crops.name / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    shutil.copy(ws / "pre" / SOURCE / "nnUNetPlans.json", folder / "plans.json")
    tiny_plans(folder / "plans.json", "3d_fullres")
    plans = json.loads((folder / "plans.json").read_text())
    plans["dataset_name"] = crops.name
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    shutil.copy(crops / "dataset.json", folder / "dataset.json")
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(0)
    network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 2,
                                     deep_supervision=False)
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": None},
               folder / "fold_0" / "checkpoint_final.pth")
    return ws / "res"


def _crop_predictions(crops: Path, folder: Path) -> Path:
    """A folder as nnUNetv2_predict writes it for the crop dataset's images: per case a label map on the crop's
    grid (the training label, or the CT above 0 HU for test cases) and the model's dataset.json."""
    folder.mkdir(parents=True)
    shutil.copy(crops / "dataset.json", folder / "dataset.json")
    for image in sorted(crops.glob("images*/*_0000.nii.gz")):
        case = image.name[: -len("_0000.nii.gz")]
        label = crops / "labelsTr" / f"{case}.nii.gz"
        if label.exists():
            shutil.copy(label, folder / f"{case}.nii.gz")
        else:
            ct = sitk.ReadImage(str(image))
            sitk.WriteImage(sitk.Cast(ct > 0, sitk.sitkUInt8), str(folder / f"{case}.nii.gz"), useCompression=True)
    return folder


def _link_source(ws: Path, assets: dict) -> None:
    (ws / "raw" / SOURCE).symlink_to(assets["source"])


def commands(assets: dict) -> dict[str, Command]:
    """The data-set-level commands, as run on the assets (paths inside the workspace through ``cur``)."""
    ape, bpr, loc, source = assets["ape"], assets["bpr"], assets["localizer"], assets["source"]

    def crops_and_model(ws: Path) -> None:
        _link_source(ws, assets)
        (ws / "raw" / assets["crops"].name).symlink_to(assets["crops"])
        (ws / "res" / assets["crops"].name).symlink_to(assets["results"] / assets["crops"].name)

    def preprocessed(ws: Path) -> None:
        _link_source(ws, assets)
        shutil.copytree(assets["preprocessed"], ws / "pre" / SOURCE, symlinks=True)

    def unlabeled_inputs(ws: Path) -> None:
        inputs = ws / "inputs"
        inputs.mkdir()
        for i, case in enumerate(TRAIN):  # two NIfTI inputs (linked) and two NRRD (converted)
            image = source / "imagesTr" / f"{case}_0000.nii.gz"
            if i % 2:
                sitk.WriteImage(sitk.ReadImage(str(image)), str(inputs / f"{case}.nrrd"), useCompression=True)
            else:
                (inputs / f"{case}.nii.gz").symlink_to(image)

    cases = [f"{c}.nii.gz" for c in sorted(TRAIN + TEST)]
    cur = "cur"  # relative to the zygote's working directory (the harness's base): the workspace at hand
    return {
        "crop-dataset": Command("crop-dataset", [["crop-dataset", "-d", "950", "-l", loc, "--organs", ORGAN, "-o", "953",
                                                  "--device", "cpu"]], lambda ws: _link_source(ws, assets), ["raw"],
                                raw_datasets=["Dataset953_*"]),
        "channels-dataset": Command("channels-dataset", [["channels-dataset", "-d", "950", "-o", "954", "--bpr-model", bpr,
                                                          "--device", "cpu"]], lambda ws: _link_source(ws, assets), ["raw"],
                                    raw_datasets=["Dataset954_*"]),
        "unlabeled-dataset": Command("unlabeled-dataset", [["unlabeled-dataset", "-i", f"{cur}/inputs", "-o", "955"]],
                                     unlabeled_inputs, ["raw"], raw_datasets=["Dataset955_*"]),
        "uncrop": Command("uncrop", [["uncrop", "-i", assets["crop_predictions"], "-o", f"{cur}/out/uncropped"]],
                          crops_and_model, ["out"], predictions={"out/uncropped": cases}),
        "embed": Command("embed", [["embed", "-m", ape, "-i", "950", "-o", f"{cur}/out/maps", "--device", "cpu", "--png"]],
                         lambda ws: _link_source(ws, assets), ["out"]),
        "localize-predict": Command("localize-predict", [["localize", "predict", "-l", loc, "-i", "950", "-o", f"{cur}/out/boxes",
                                                          "--png", "--device", "cpu"]], lambda ws: _link_source(ws, assets), ["out"]),
        "score": Command("score", [["score", "-m", bpr, "-i", "950", "-o", f"{cur}/out/scores", "--device", "cpu"]],
                         lambda ws: _link_source(ws, assets), ["out"]),
        "preprocess": Command("preprocess", [["preprocess", "-d", "950", "-c", f"3d_fullres_ape_{ORGAN}", "-np", "1", "--device", "cpu"]],
                              preprocessed, [f"pre/{SOURCE}"]),
        "predict": Command("predict", [["predict", "-i", "950", "-o", f"{cur}/out/pred", "-d", "953", "-c", "3d_fullres",
                                        "-device", "cpu", "--disable_tta", "--max-regrow", "1", "--num-parts", "2", "--part-id", str(p)]
                                       for p in (0, 1)], crops_and_model, ["out"], predictions={"out/pred": cases}),
    }


@pytest.fixture(scope="module")
def references(harness, assets) -> dict:
    """Per command, the workspace of an uninterrupted run and its timing (made when a test first asks)."""
    return {}


def _reference(harness: Harness, references: dict, command: Command):
    if command.name not in references:
        workspace = harness.workspace(command, "reference")
        result = harness.run(command, workspace, "reference")
        assert all(c == 0 for c in result.codes), "\n".join(log.read_text()[-3000:] for log in result.logs)
        _check_for_nnunet(harness, workspace, command)
        references[command.name] = (workspace, result)
    return references[command.name]


def _check_for_nnunet(harness: Harness, workspace: Path, command: Command) -> None:
    """nnU-Net's verify_dataset_integrity passes on the raw datasets written; nnUNetv2_evaluate_folder's listing
    (files with the dataset's ending, directly in the folder) finds exactly the cases in prediction folders."""
    from batchgenerators.utilities.file_and_folder_operations import subfiles

    for pattern in command.raw_datasets:
        (dataset,) = (workspace / "raw").glob(pattern)
        harness.zygote.call("kill_harness:verify_raw", [str(dataset)], workspace / "logs" / f"verify-{dataset.name}.log")
    for folder, expected in command.predictions.items():
        assert subfiles(str(workspace / folder), suffix=".nii.gz", join=False) == expected


def _report(entry: dict) -> None:
    left = entry["left"]
    timing = f" at {entry['killed_at_s']:.1f} s (uninterrupted {entry['uninterrupted_s']:.1f} s)" if "killed_at_s" in entry else ""
    say(f"[kill] {entry['command']}: {entry['kill']}{timing}{'' if entry['killed'] else ' -- it had finished'}; left "
        f"{left['visible_files']} visible file(s), {left['partial_dataset_files']} in a hidden partial dataset, "
        f"{left['staging_files']} staged; rerun {entry['rerun_s']:.1f} s: {'as uninterrupted' if entry['held'] else 'DIFFERENT'}")


def _kill(harness: Harness, assets: dict, references: dict, name: str, seed: int) -> None:
    command = commands(assets)[name]
    reference, result = _reference(harness, references, command)
    _report(harness.kill_and_rerun(command, seed, reference, result))
    _check_for_nnunet(harness, reference.parent / f"{name}-kill{seed}", command)


def _kill_at(harness: Harness, assets: dict, references: dict, name: str, when: str, pattern: str) -> None:
    command = commands(assets)[name]
    reference, _ = _reference(harness, references, command)
    entry = harness.kill_at_rename(command, when, pattern, reference)
    _report(entry)


NAMES = ["crop-dataset", "channels-dataset", "unlabeled-dataset", "uncrop", "embed", "localize-predict", "score",
         "preprocess", "predict"]

# the hand-overs of finished data: a dataset renamed into place (its state still beside it just after), the last file
# of a preprocessed case (nnU-Net lists cases by their .b2nd), a prediction's label map before its done mark
RENAMES = [("crop-dataset", "before", "*/raw/Dataset953_*"), ("crop-dataset", "after", "*/raw/Dataset953_*"),
           ("unlabeled-dataset", "before", "*/raw/Dataset955_*"), ("preprocess", "before", "*/hn_004.b2nd"),
           ("predict", "after", "*/pred/hn_004.nii.gz")]


@pytest.mark.parametrize("name", NAMES)
def test_killed_command_reruns_to_the_uninterrupted_result(harness, assets, references, name):
    for seed in SEEDS_DEFAULT:
        _kill(harness, assets, references, name, seed)


@pytest.mark.parametrize("name, when, pattern", RENAMES)
def test_killed_at_a_hand_over_reruns_to_the_uninterrupted_result(harness, assets, references, name, when, pattern):
    _kill_at(harness, assets, references, name, when, pattern)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_killed_command_reruns_to_the_uninterrupted_result_at_more_points(harness, assets, references, name):
    for seed in SEEDS_SLOW:
        _kill(harness, assets, references, name, seed)


def _refused(log: Path) -> str:
    """The one line a refused job printed (and nothing else on stderr but progress bars)."""
    lines = [line for line in log.read_text().splitlines() if line.startswith("nnunet-ape: error:")]
    assert len(lines) == 1 and "Traceback" not in log.read_text(), log.read_text()[-2000:]
    return lines[0]


@pytest.mark.parametrize("name, pattern, what", [
    ("crop-dataset", "*/.Dataset953_*.state/cases/hn_001.json", "another job is writing Dataset953"),
    ("preprocess", "*/hn_001.b2nd", "another nnunet-ape plan or preprocess job is writing Dataset950"),
    ("predict", "*/pred/hn_001.nii.gz", "another job is predicting part 0 of 2 into this folder"),
])
def test_the_same_job_twice_at_once_is_refused_in_one_line(harness, assets, references, name, pattern, what):
    """While a job writes (held at its first case), the same job started again stops with one line and writes
    nothing; the first one then finishes as if alone (predict: the other part runs meanwhile)."""
    command = commands(assets)[name]
    reference, _ = _reference(harness, references, command)
    ws = harness.workspace(command, "twice")
    logs = ws / "logs"
    first = harness.paused(command.steps[0], pattern, logs / "go", logs / "first.log")
    assert harness.zygote.wait(harness.zygote.start(command.steps[0], logs / "second.log")) == 2
    assert what in _refused(logs / "second.log")
    others = [harness.zygote.start(argv, logs / f"other-{i}.log") for i, argv in enumerate(command.steps[1:])]
    assert [harness.zygote.wait(p) for p in others] == [0] * len(others)
    (logs / "go").touch()
    assert harness.zygote.wait(first) == 0, (logs / "first.log").read_text()[-3000:]
    assert compare(reference, ws, command) == []
    _check_for_nnunet(harness, ws, command)


def test_crop_dataset_parts_finishing_together_assemble_once(harness, assets, references):
    """Two --num-parts parts held before their last case, then let go at once: one assembles the dataset, the other
    finds it done or leaves it to the first; the dataset is what one uninterrupted job writes."""
    command = commands(assets)["crop-dataset"]
    reference, _ = _reference(harness, references, command)
    ws = harness.workspace(command, "parts")
    logs = ws / "logs"
    argv = command.steps[0] + ["--num-parts", "2"]
    parts = [harness.paused(argv + ["--part-id", str(p)], f"*/.Dataset953_*.state/cases/{case}.json", logs / f"go{p}",
                            logs / f"part{p}.log") for p, case in ((0, "hn_003"), (1, "hn_005"))]
    (logs / "go0").touch()
    (logs / "go1").touch()
    assert [harness.zygote.wait(p) for p in parts] == [0, 0], _tails(logs)
    assert compare(reference, ws, command) == []
    _check_for_nnunet(harness, ws, command)


def _tails(folder: Path) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in sorted(folder.glob("*.log")))


def test_a_truncated_case_stops_preprocess_before_any_output(harness, assets):
    """preprocess checks every training case's files (as crop-dataset does, tests/test_corrupt_inputs.py) before it
    writes: a truncated CT among four stops it with one line, and nnU-Net's folders stay as they were."""
    command = commands(assets)["preprocess"]
    ws = harness.zygote.use(harness.base / "preprocess-truncated")
    shutil.copytree(assets["source"], ws / "raw" / SOURCE)
    shutil.copytree(assets["preprocessed"], ws / "pre" / SOURCE, symlinks=True)
    bad = ws / "raw" / SOURCE / "imagesTr" / "hn_004_0000.nii.gz"
    bad.write_bytes(bad.read_bytes()[:2000])
    before = sorted(p.name for p in (ws / "pre" / SOURCE).iterdir())
    log = ws / "logs" / "preprocess.log"
    assert harness.zygote.wait(harness.zygote.start(command.steps[0], log)) == 2
    line = _refused(log)
    assert "case 'hn_004'" in line and "truncated" in line and bad.name in line
    assert sorted(p.name for p in (ws / "pre" / SOURCE).iterdir()) == before
