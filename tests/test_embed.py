"""Whole-volume embedding on real CT: geometry, seams, position content, CLI and bad inputs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DATA, patient
from nnunet_ape.checkpoint import load_ape_model
from nnunet_ape.embed import EmbedSettings, embed_volume, sliding_window, window_starts
from nnunet_ape.intensity import normalize_hu
from nnunet_ape.io import read_volume, to_canonical, write_volume
from nnunet_ape.position_fit import position_r2
from nnunet_ape.resample import resample_spacing


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nnunet_ape", *args], capture_output=True, text=True)


@pytest.mark.parametrize("key", ["A", "B", "B_dicom"])
def test_embed_cli_output_overlays_the_input(pretrained_run, tmp_path, key):
    out = tmp_path / "maps"
    result = _cli("embed", "-m", str(pretrained_run / "checkpoint_final.pt"), "-i", str(patient(key)), "-o", str(out),
                  "--device", "cpu", "--png")
    assert result.returncode == 0, result.stderr[-2000:]
    written = sorted(out.glob("*_ape.nii.gz"))
    assert len(written) == 1
    image, reference = sitk.ReadImage(str(written[0])), sitk.ReadImage(str(patient("B" if key == "B_dicom" else key)))
    assert image.GetSize() == reference.GetSize()
    assert image.GetNumberOfComponentsPerPixel() == 3
    assert np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    assert np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    assert np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)
    assert np.isfinite(sitk.GetArrayFromImage(image)).all()
    assert written[0].with_name(written[0].name.replace(".nii.gz", ".png")).stat().st_size > 20_000


def test_float16_and_stride4_outputs(pretrained_run):
    model, _ = load_ape_model(pretrained_run / "checkpoint_final.pt")
    volume = read_volume(patient("A"))  # RAS-like: flipped axes must still land on the right voxels
    full = embed_volume(model, volume, EmbedSettings(), progress=False)
    half = embed_volume(model, volume, EmbedSettings(half=True), progress=False)
    strided = embed_volume(model, volume, EmbedSettings(stride=4), progress=False)
    assert half.array.dtype == np.float16 and np.allclose(half.array, full.array, atol=1e-2)
    assert strided.shape == tuple(int(np.ceil(n / 4)) for n in volume.shape)
    assert np.allclose(strided.spacing, np.array(volume.spacing) * 4)
    assert np.allclose(strided.origin, volume.origin) and np.allclose(strided.direction, volume.direction)
    assert np.allclose(strided.array, full.array[::4, ::4, ::4], atol=1e-5)  # voxel j sits on input voxel 4j


def _border_and_interior_jumps(embedding: torch.Tensor, patch: int, overlap: float) -> tuple[float, float]:
    """Largest mean |difference| between neighbouring slices across window borders, and away from them."""
    border, interior = [], []
    for axis in range(3):
        n = embedding.shape[axis + 1]
        jumps = embedding.diff(dim=axis + 1).abs().mean(dim=[d for d in range(4) if d != axis + 1]).numpy()
        edges = {i for s in window_starts(n, patch, overlap) for i in (s - 1, s + patch - 1) if 0 <= i < n - 1}
        border += [jumps[i] for i in edges]
        interior += [jumps[i] for i in range(n - 1) if all(abs(i - e) > 1 for e in edges)]
    return max(border), max(interior)


def test_no_seams_at_window_borders(pretrained_run):
    model, _ = load_ape_model(pretrained_run / "checkpoint_final.pt")
    canon, _ = to_canonical(read_volume(patient("C")))
    image, _ = resample_spacing(normalize_hu(canon.array)[None], canon.spacing, (1.5, 1.5, 2.25))
    patch = 48
    blended = sliding_window(model, image, EmbedSettings(patch_size=(patch,) * 3, overlap=0.5), torch.device("cpu"), False)
    border, interior = _border_and_interior_jumps(blended, patch, 0.5)
    print(f"blended windows: border jump {border:.4f}, interior jump {interior:.4f}")
    assert border <= interior
    # control: the same check does find the seams of windows placed side by side without overlap
    tiled = sliding_window(model, image, EmbedSettings(patch_size=(patch,) * 3, overlap=0.0), torch.device("cpu"), False)
    border, interior = _border_and_interior_jumps(tiled, patch, 0.0)
    assert border > 1.3 * interior


def test_map_is_a_smooth_function_of_position(pretrained_run):
    model, _ = load_ape_model(pretrained_run / "checkpoint_final.pt")
    scores = {}
    for key in ("A", "C"):
        volume = read_volume(patient(key))
        body = volume.array > -500
        scores[key] = position_r2(embed_volume(model, volume, EmbedSettings(), progress=False), body)
        untrained = embed_volume(type(model)(model.config).eval(), volume, EmbedSettings(), progress=False)
        baseline = position_r2(untrained, body)
        print(f"patient {key}: R^2 of a linear fit embedding -> position over the body = {scores[key]:.3f} "
              f"(untrained network: {baseline:.3f})")
        assert scores[key] > baseline + 0.3
    # A is the only abdomen-pelvis scan among the five training CTs, so it is the harder one. The fixture is
    # deterministic, but float summation order is not part of it: 0.5 held in 2026-11, a fresh install on 2026-12-02
    # gave 0.414 / 0.537, and training with 1 torch thread instead of 2 (same day) gives 0.408 / 0.488. The bars
    # below keep a margin under those and far above the untrained network (about 0.02).
    assert min(scores.values()) > 0.35
    assert np.mean(list(scores.values())) > 0.4


def test_bad_inputs_give_one_line_error_and_no_output(pretrained_run, tmp_path):
    thin = tmp_path / "thin.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 64, 64), np.int16)), str(thin))
    not_image = tmp_path / "notes.nii.gz"
    not_image.write_text("hello")
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((64, 64), np.int16)), str(flat))
    model = str(pretrained_run / "checkpoint_final.pt")
    for bad, message in [(thin, "too small"), (not_image, "not a readable image"), (flat, "2D")]:
        out = tmp_path / f"out_{bad.stem}"
        result = _cli("embed", "-m", model, "-i", str(bad), "-o", str(out), "--device", "cpu")
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and str(bad) in lines[0]
        assert not out.exists()
    result = _cli("embed", "-m", str(tmp_path / "nope.pt"), "-i", str(patient("A")), "-o", str(tmp_path / "o"))
    assert result.returncode == 2 and "checkpoint not found" in result.stderr


def test_embed_over_a_folder_keeps_finished_maps_when_restarted(pretrained_run, tmp_path):
    headneck = DATA.parent / "Dataset901_HeadNeckCT" / "imagesTr"
    if not headneck.exists():
        pytest.skip("head-and-neck dataset not available")
    folder = tmp_path / "cts"
    for name in ("hn_001_0000.nii.gz", "hn_002_0000.nii.gz"):  # a 48^3 block of each: the resume logic needs no more
        ct = read_volume(headneck / name)
        corner = ct.index_to_physical(np.array([40.0, 40.0, 40.0]))
        block = type(ct)(ct.array[40:88, 40:88, 40:88], ct.spacing, tuple(corner), ct.direction)
        write_volume(block, folder / name)
    model, out = str(pretrained_run / "checkpoint_final.pt"), tmp_path / "maps"
    first = _cli("embed", "-m", model, "-i", str(folder), "-o", str(out), "--device", "cpu")
    assert first.returncode == 0, first.stderr[-2000:]
    kept, redo = out / "hn_001_ape.nii.gz", out / "hn_002_ape.nii.gz"
    stamp = kept.stat().st_mtime_ns
    redo.unlink()  # as if the job had stopped before this case
    again = _cli("embed", "-m", model, "-i", str(folder), "-o", str(out), "--device", "cpu")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "1 of 2 maps exist already" in again.stdout and redo.exists() and kept.stat().st_mtime_ns == stamp
    forced = _cli("embed", "-m", model, "-i", str(folder), "-o", str(out), "--device", "cpu", "--overwrite")
    assert forced.returncode == 0 and kept.stat().st_mtime_ns != stamp


def test_resampling_in_slabs_gives_the_same_values():
    """``canonical_map`` resamples a large CT's map in slabs of slices (issue 29, item 8: GBs of full-resolution
    temporaries on the GPU otherwise): bit for bit the one-piece resampling, also where coordinates run past the
    source's last slice."""
    from nnunet_ape.embed import resample_in_slabs
    from nnunet_ape.resample import resample_grid

    generator = torch.Generator().manual_seed(0)
    array = torch.randn((3, 7, 6, 9), generator=generator)
    coords = [torch.arange(13) * 0.47, torch.arange(11) * 0.5, torch.arange(23) * 0.3711]  # z runs past 8
    whole = resample_grid(array, coords).permute(1, 2, 3, 0).numpy()
    for elements in (1, 3 * 13 * 11 * 4, 10**9):  # one slice, four slices, all at once
        assert np.array_equal(resample_in_slabs(array, coords, slab_elements=elements), whole)
    assert np.array_equal(resample_in_slabs(array, coords, np.float16, 1), whole.astype(np.float16))
