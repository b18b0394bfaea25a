"""The ``embed`` job over files: check inputs, embed each CT, write NIfTI maps (and PNGs) atomically."""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from nnunet_ape.checkpoint import load_ape_model
from nnunet_ape.embed import EmbedSettings, embed_volume
from nnunet_ape.errors import InputError
from nnunet_ape.input_checks import Skipped, check_image
from nnunet_ape.io import IMAGE_SUFFIXES, output_name, read_volume, write_volume
from nnunet_ape.plots import embedding_overlay_png
from nnunet_ape.resume import unfinished

MIN_VOXELS = 8  # per axis; smaller inputs carry too little anatomy for a positional embedding


def check_header(path: Path, min_size: int = MIN_VOXELS) -> None:
    """Cheap pre-flight check of a CT file's header (readable, complete, scalar 3D, at least ``min_size`` voxels per
    axis; :func:`nnunet_ape.input_checks.check_image`) so a bad file stops the job before any output. DICOM folders
    are checked when read."""
    check_image(path, min_size)


def output_paths(images: list[Path], out: Path) -> list[Path]:
    """Where each map goes: ``out`` itself for one input and an image-suffixed ``out``, else ``out/<case>_ape.nii.gz``."""
    if len(images) == 1 and out.name.lower().endswith(IMAGE_SUFFIXES):
        return [out]
    names = [output_name(p) for p in images]
    if len(set(names)) != len(names):
        raise InputError("input cases share names; give them unique file names")
    return [out / f"{name}_ape.nii.gz" for name in names]


def embed_files(
    checkpoint: Path, images: list[Path], out: Path, settings: EmbedSettings, device: str, png: bool = False,
    overwrite: bool = False,
) -> list[Path]:
    """Embed every image with the model in ``checkpoint``; returns the map paths (written now or kept).

    Input headers are checked before anything is written (a case whose voxels turn out unusable, NaN, is skipped with
    a warning and named in an InputError at the end); each output file is written atomically (the map last), so a map
    that exists is complete: it is kept (a restarted job goes on where it stopped) unless ``overwrite``.
    """
    model, _ = load_ape_model(checkpoint)
    for image in images:
        check_header(image)
    targets = output_paths(images, out)
    todo = unfinished(list(zip(images, targets)), lambda pair: pair[1], overwrite, "maps")
    skipped = Skipped()  # cases whose voxels cannot be used (NaN): left out, named at the end
    for image, target in tqdm(todo, desc="cases", unit="ct", disable=len(todo) <= 1):
        volume = skipped.read(output_name(image), lambda: read_volume(image, min_size=MIN_VOXELS))
        if volume is None:
            continue
        began = time.perf_counter()
        embedding = embed_volume(model, volume, settings, device=device)
        seconds = time.perf_counter() - began
        if png:  # before the map, which marks the case done (a kill in between leaves the case to redo)
            # a strided map overlays the CT subsampled on the same grid
            step = settings.stride
            ct = embedding.with_array(volume.array[::step, ::step, ::step]) if step > 1 else volume
            png_path = target.with_name(output_name(target) + ".png")
            embedding_overlay_png(ct, embedding, png_path, title=f"{image.name}: APE map ({seconds:.1f} s)")
        write_volume(embedding, target)
        print(f"{image} -> {target} ({seconds:.2f} s)")
    skipped.finish()
    return targets
