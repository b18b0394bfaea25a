"""Figures: planes through the boxes, patient directions on the edges, short scans at a readable size."""

from __future__ import annotations

import matplotlib.image
import numpy as np

from conftest import patient
from nnunet_ape.io import read_volume, to_canonical
from nnunet_ape.plots import EDGE_LETTERS, _planes, boxes_png, embedding_overlay_png, slice_through_boxes


def test_the_slice_reaches_the_most_boxes():
    a, b, c = (np.array([[0, 0, lo], [9, 9, hi]]) for lo, hi in ((10, 20), (15, 30), (60, 70)))
    assert 15 <= slice_through_boxes([a, b, c], axis=2, size=100) <= 20  # a and b overlap there
    assert 60 <= slice_through_boxes([c], axis=2, size=100) <= 70  # not the image centre, which misses the box
    assert slice_through_boxes([], axis=2, size=100) == 50


def test_edge_letters_name_the_patient_directions_of_real_ct():
    for key in ("A", "B"):  # RAS-like and LPS storage
        canon, _ = to_canonical(read_volume(patient(key)))
        index = np.stack(np.meshgrid(*[np.arange(n) for n in canon.shape], indexing="ij"), -1)
        lps = canon.index_to_physical(index)  # mm: x grows to the left, y to posterior, z to superior
        planes = _planes(lps, tuple(s // 2 for s in canon.shape))
        for plane, name in zip(planes, ("axial", "coronal", "sagittal")):
            top, bottom, left, right = EDGE_LETTERS[name]
            direction = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}
            axis, sign = direction[bottom]
            assert sign * (plane[-1, :, axis].mean() - plane[0, :, axis].mean()) > 0, (key, name, "rows")
            axis, sign = direction[right]
            assert sign * (plane[:, -1, axis].mean() - plane[:, 0, axis].mean()) > 0, (key, name, "columns")
            assert {top, bottom} in ({"A", "P"}, {"S", "I"}) and {left, right} in ({"R", "L"}, {"A", "P"})


def test_a_short_scan_gets_full_width_coronal_and_sagittal_panels_in_both_figures(tmp_path):
    ct = read_volume(patient("B"))  # 20 slices of 2 mm beside 500 mm
    boxes = {"liver": {"crop_box_voxels": [[100, 120, 5], [200, 220, 15]]}}
    height, width = matplotlib.image.imread(boxes_png(ct, boxes, tmp_path / "b.png")).shape[:2]
    assert height > 0.6 * width  # stacked; side by side a 3-panel row is 5.5 x 15 inches
    embedding = ct.with_array(np.stack([ct.array] * 3, axis=-1).astype(np.float32))
    height, width = matplotlib.image.imread(embedding_overlay_png(ct, embedding, tmp_path / "e.png")).shape[:2]
    assert height > 0.8 * width  # 5 rows; side by side the 2 x 3 panels are 8 x 12 inches
