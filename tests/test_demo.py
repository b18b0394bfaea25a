"""``nnunet-ape demo``: the product end to end on phantoms (issue 32, item 1).

At toy sizes (3 training phantoms, a pretraining cut short, seconds of nnU-Net training; ``slow`` since 2026-12-06,
3-5 minutes of the default suite's 20): every step runs, the outputs lie where the report says and on the phantoms'
grids, a cut-short run says so, a resumed one continues and remakes what depends on the APE model. The default
suite checks the refusals of bad numbers. Another ``slow`` test runs the demo as a user does
(its defaults) and checks what it promises: a localizer that keeps the organs on held-out phantoms, crops that
leave out part of each image, and a crop model whose Dice is close to that of the full-image model trained for the
same time, or better.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from nnunet_ape.cli import main
from nnunet_ape.demo import DEMO_ITERATIONS, run_demo
from nnunet_ape.io import read_volume


def _table(text: str) -> dict[str, dict[str, str]]:
    """The report's model table: model -> column -> cell."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells)) for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}


@pytest.mark.slow
def test_demo_at_toy_size_runs_every_step_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    report = run_demo(out, cases=3, heldout=1, minutes=0.2, model="tiny", device="cpu", workers=1, train_minutes=0.05,
                      organs=("liver", "spleen"))  # two organs: one crop around both
    text = report.read_text()
    done = torch.load(out / "ape" / "checkpoint_final.pt", weights_only=False)["iteration"]
    assert 0 < done < DEMO_ITERATIONS
    assert f"cut short: the 0.2-minute cap ended it after {done} of {DEMO_ITERATIONS} iterations" in text
    r2 = float(re.search(r"R\^2 = (-?[0-9.]+)", text).group(1))
    assert -1.0 <= r2 <= 1.0

    source = out / "nnUNet_raw" / "Dataset900_DemoPhantoms"
    crops = out / "nnUNet_raw" / "Dataset901_DemoPhantomsLiverSpleenCrop"
    labels = {"background": 0, "liver": 1, "spleen": 2}
    assert json.loads((source / "dataset.json").read_text())["labels"] == labels
    assert json.loads((crops / "dataset.json").read_text())["labels"] == labels
    manifest = json.loads((crops / "crops.json").read_text())
    skipped = [c for c in manifest["skipped_cases"] if c["split"] == "train"]  # phantoms without both organs in view
    assert len(list((crops / "imagesTr").iterdir())) + len(skipped) == 3 and len(list((crops / "imagesTs").iterdir())) == 1
    for model in ("crop", "full"):  # both models predicted the held-out phantom on its own grid
        pred = read_volume(out / "predictions" / model / "phantom_003.nii.gz")
        assert pred.same_geometry(read_volume(source / "imagesTs" / "phantom_003_0000.nii.gz"), atol=1e-4)
        assert set(np.unique(pred.array)) <= {0, 1, 2}
        trained = json.loads(next((out / "nnUNet_results").glob(f"Dataset90{model == 'crop' and 1 or 0}_*/nnUNetTrainerDemo__*/fold_0/training.json")).read_text())
        assert trained["iterations"] >= 25 and trained["train_seconds"] > 0
    table = _table(text)
    assert set(table) == {"localized crop model", "full-image model"}
    for row in table.values():
        assert 0.0 <= float(row["Dice liver"]) <= 1.0 and float(row["predict s / case"]) > 0
    assert table["full-image model"]["image share predicted: first crop / after regrowth"] == "100% / 100%"
    assert "localizer on the held-out phantoms: its crop held" in text
    assert (out / "contours.png").stat().st_size > 20_000 and (out / "heldout_ape.png").exists()

    assert main(["demo", "-o", str(out), "--cases", "3", "--minutes", "0.1", "--device", "cpu"]) == 2
    assert "already exists" in capsys.readouterr().err
    # resumed to an iteration count it reaches: the pretraining goes on to it, the localizer and the crop model are
    # made again from the new APE model, the full-image model is kept
    full_model = next((out / "nnUNet_results").glob("Dataset900_*/*/fold_0/checkpoint_final.pth"))
    full_time = full_model.stat().st_mtime
    old_localizer = json.loads((out / "localizer.json").read_text())["ape_sha256"]
    text = run_demo(out, cases=3, heldout=1, minutes=5, device="cpu", workers=1, resume=True, iterations=done + 20,
                    train_minutes=0.05, organs=("liver", "spleen")).read_text()
    assert torch.load(out / "ape" / "checkpoint_final.pt", weights_only=False)["iteration"] == done + 20
    assert "cut short" not in text and f"pretraining: {done + 20} iterations" in text
    assert json.loads((out / "localizer.json").read_text())["ape_sha256"] != old_localizer
    assert full_model.stat().st_mtime == full_time
    assert (out / "predictions" / "crop" / "phantom_003.nii.gz").exists()


def test_demo_refuses_bad_numbers(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "d"), "--cases", "2"]) == 2
    assert "at least 3 training phantoms" in capsys.readouterr().err
    assert main(["demo", "-o", str(tmp_path / "d"), "--heldout", "0"]) == 2
    assert "at least 1 held-out phantom" in capsys.readouterr().err
    assert main(["demo", "-o", str(tmp_path / "d"), "--organs", "liver", "heart"]) == 2
    assert "the phantoms have no organ 'heart'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # refused before anything is written


@pytest.mark.slow
def test_demo_with_its_defaults_shows_the_product(tmp_path):
    """The demo as a user runs it (about 10 minutes on 2 quiet cores)."""
    out = tmp_path / "demo"
    text = run_demo(out, device="cpu").read_text()
    print(text)  # the demo's figures, for the README's timing line (pytest -s)
    assert "cut short" not in text
    inside = [float(v) for v in re.findall(r"its crop held [0-9.]+ of the \w+ on average, at least ([0-9.]+)", text)]
    assert len(inside) == 1 and min(inside) >= 0.99, text
    table = _table(text)
    crop, full = table["localized crop model"], table["full-image model"]
    first_crop = float(crop["image share predicted: first crop / after regrowth"].split("%")[0])
    assert first_crop < 30  # the localizer's spleen crops leave out most of each image
    for organ in ("spleen",):
        assert float(crop[f"Dice {organ}"]) >= float(full[f"Dice {organ}"]) - 0.05, text
