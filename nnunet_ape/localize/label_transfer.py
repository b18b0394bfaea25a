"""All-voxels few-shot boxes: k-nearest-neighbour label transfer in APE space (beyond the paper's 6 edge points).

Every voxel of the shots takes part, organ and background alike. The shots' maps are sampled on a grid of
``step_mm`` inside their body boxes; each sample keeps its label. On a test map, every grid voxel inside the body
box gets, per organ, the fraction of its ``k`` nearest shot samples (Euclidean, in embedding space) that carry the
organ's label. Voxels whose fraction reaches ``threshold`` form a coarse mask, and the box of its largest connected
component (at full resolution) is the prediction. One neighbour search per test map serves every organ.

All arrays are in one index space (canonical LPS in this package): maps ``(X, Y, Z, C)``, labels ``(X, Y, Z)``,
boxes ``(2, 3)`` of inclusive voxel indices (row 0 low corner, row 1 high corner).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from nnunet_ape.localize.boxes import alpha_over_shots, mask_box

DEFAULT_K = 10
DEFAULT_THRESHOLD = 0.3
DEFAULT_STEP_MM = 4.0
MAX_SAMPLES = 150_000


@dataclass(frozen=True)
class Grid:
    """A sampling grid inside a box: voxel ``origin + i * stride`` for ``i < dims`` per axis."""

    origin: np.ndarray  # (3,) int, first voxel
    stride: np.ndarray  # (3,) int, voxels between samples
    dims: tuple[int, int, int]

    def indices(self) -> np.ndarray:
        """Voxel indices ``(P, 3)`` of the grid points, x slowest (C order over ``dims``)."""
        axes = [o + s * np.arange(n) for o, s, n in zip(self.origin, self.stride, self.dims)]
        return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)

    def to_voxels(self, box: np.ndarray) -> np.ndarray:
        """A box ``(2, 3)`` in grid cells -> the full-resolution box it covers (each cell spans ``stride`` voxels)."""
        return np.stack([self.origin + box[0] * self.stride, self.origin + box[1] * self.stride + self.stride - 1]).astype(np.float64)


def body_grid(body: np.ndarray, spacing: np.ndarray, shape: tuple[int, ...], step_mm: float = DEFAULT_STEP_MM) -> Grid:
    """The grid of about ``step_mm`` (per axis, at least one voxel) covering the body box ``(2, 3)`` of an image of
    ``shape`` voxels of ``spacing`` mm (same axis order)."""
    stride = np.maximum(1, np.round(step_mm / np.asarray(spacing, dtype=np.float64))).astype(int)
    lo = np.clip(np.floor(body[0]).astype(int), 0, np.asarray(shape[:3]) - 1)
    hi = np.clip(np.ceil(body[1]).astype(int), lo, np.asarray(shape[:3]) - 1)
    dims = tuple(int(n) for n in (hi - lo) // stride + 1)
    return Grid(lo, stride, dims)  # type: ignore[arg-type]


@dataclass
class LabelSamples:
    """Labeled points in embedding space: ``embeddings`` ``(P, C)`` float32, ``labels`` ``(P,)`` integer.

    Partially contoured data sets label an organ 0 where a case does not contour it, although the organ is there.
    ``groups`` ``(P,)`` int32 and ``group_values`` say which organs each sample's shot contours: sample i's shot
    contours the label values ``group_values[groups[i]]``. ``group_values`` None: every shot contours every organ.
    """

    embeddings: np.ndarray
    labels: np.ndarray
    groups: np.ndarray | None = None
    group_values: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if self.groups is None:
            self.groups = np.zeros(len(self.labels), dtype=np.int32)

    @classmethod
    def from_shot(cls, embedding: np.ndarray, label: np.ndarray, grid: Grid, keep: list[int] | None = None,
                  contoured: list[int] | None = None) -> "LabelSamples":
        """Sample a shot's map ``(X, Y, Z, C)`` and label array ``(X, Y, Z)`` on ``grid``; label values not in ``keep``
        (when given) become background 0. ``contoured``: the label values this shot contours (None: all). Grid points
        outside the search region (non-finite map values) are left out."""
        idx = grid.indices()
        labels = np.asarray(label[idx[:, 0], idx[:, 1], idx[:, 2]])
        if keep is not None:
            labels = np.where(np.isin(labels, keep), labels, 0)
        values = np.asarray(embedding[idx[:, 0], idx[:, 1], idx[:, 2]], dtype=np.float32)
        inside = np.isfinite(values).all(1)
        groups = None if contoured is None else [sorted(int(v) for v in contoured)]
        return cls(values[inside], labels[inside].astype(np.int32), None, groups)

    @classmethod
    def pooled(cls, parts: list["LabelSamples"], max_samples: int = MAX_SAMPLES, seed: int = 0) -> "LabelSamples":
        """All parts together, randomly thinned to ``max_samples`` (same draw for the same inputs and seed)."""
        embeddings = np.concatenate([p.embeddings for p in parts])
        labels = np.concatenate([p.labels for p in parts])
        groups, table = None, None
        if any(p.group_values is not None for p in parts):
            everything = sorted({int(v) for p in parts for v in np.unique(p.labels) if v} |
                                {v for p in parts for g in (p.group_values or []) for v in g})
            table, remapped = [], []
            for p in parts:
                own = p.group_values if p.group_values is not None else [everything]
                index = []
                for values in own:
                    if list(values) not in table:
                        table.append(list(values))
                    index.append(table.index(list(values)))
                remapped.append(np.asarray(index, dtype=np.int32)[p.groups])
            groups = np.concatenate(remapped)
        if len(labels) > max_samples:
            keep = np.sort(np.random.default_rng(seed).choice(len(labels), max_samples, replace=False))
            embeddings, labels = embeddings[keep], labels[keep]
            groups = groups[keep] if groups is not None else None
        return cls(embeddings, labels, groups, table)

    def contours(self, value: int) -> np.ndarray | None:
        """Per group, whether its shots contour ``value`` ``(G,)`` bool; None when every shot contours every organ."""
        if self.group_values is None:
            return None
        return np.array([int(value) in g for g in self.group_values], dtype=bool)


@dataclass
class Neighbours:
    """For each grid point of a test map, the labels ``(P, k)`` of its k nearest shot samples; with a partially
    contoured set of shots, their ``groups`` ``(P, k)`` and the ``samples`` (for which groups contour an organ)."""

    labels: np.ndarray
    grid: Grid
    groups: np.ndarray | None = None
    samples: LabelSamples | None = None

    def fraction(self, value: int) -> np.ndarray:
        """Per grid point ``(P,)``, the fraction of its neighbours labeled ``value`` among the neighbours whose shots
        contour it (0 where none does)."""
        hits = (self.labels == value).sum(1)
        contoured = self.samples.contours(value) if self.samples is not None else None
        if contoured is None or self.groups is None:
            return hits / self.labels.shape[1]
        counted = contoured[self.groups].sum(1)
        return np.where(counted > 0, hits / np.maximum(counted, 1), 0.0)

    def organ_box(self, value: int, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray | None:
        """Box ``(2, 3)`` of organ ``value``: the largest connected component of grid points whose neighbour fraction
        with this label reaches ``threshold``. When none does, the points at the highest fraction found; None when
        no neighbour of any point carries the label."""
        fraction = self.fraction(value).reshape(self.grid.dims)
        top = fraction.max()
        if top == 0:
            return None
        flagged = fraction >= min(threshold, top)
        components, n = ndimage.label(flagged)
        if n > 1:
            flagged = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
        return self.grid.to_voxels(mask_box(flagged))


class LabelTransfer:
    """A kd-tree over labeled shot samples; :meth:`neighbours` answers a test map's grid in one query."""

    def __init__(self, samples: LabelSamples, k: int = DEFAULT_K):
        if len(samples.labels) < k:
            raise ValueError(f"{len(samples.labels)} shot samples; label transfer needs at least k={k}")
        self.samples, self.k = samples, k
        self.tree = cKDTree(samples.embeddings)

    def neighbours(self, embedding: np.ndarray, grid: Grid) -> Neighbours:
        """Neighbour labels of the map ``(X, Y, Z, C)`` sampled on ``grid``; a grid point outside the search region
        (non-finite map values) has only background (0) neighbours."""
        idx = grid.indices()
        points = np.asarray(embedding[idx[:, 0], idx[:, 1], idx[:, 2]], dtype=np.float32)
        inside = np.isfinite(points).all(1)
        nearest = np.zeros((len(points), self.k), dtype=np.int64)
        if inside.any():
            nearest[inside] = self.tree.query(points[inside], k=self.k, workers=-1)[1].reshape(-1, self.k)
        labels = np.where(inside[:, None], self.samples.labels[nearest], 0)
        partial = self.samples.group_values is not None
        return Neighbours(labels, grid, self.samples.groups[nearest] if partial else None, self.samples if partial else None)


def held_out_boxes(
    shots: list[LabelSamples], maps: list[np.ndarray], grids: list[Grid], values: list[int], k: int = DEFAULT_K,
    threshold: float = DEFAULT_THRESHOLD,
) -> list[dict[int, np.ndarray | None]]:
    """For each shot, the boxes ``{value: (2, 3) or None}`` found on its own map ``(X, Y, Z, C)`` (sampled on its
    grid) from the other shots' samples. Empty with fewer than two shots: nothing to hold out."""
    if len(shots) < 2:
        return []
    from tqdm import tqdm

    out = []
    for held in tqdm(range(len(shots)), desc="label transfer, leave one shot out", unit="shot", disable=len(shots) < 10):
        others = LabelTransfer(LabelSamples.pooled([s for i, s in enumerate(shots) if i != held]), k)
        neighbours = others.neighbours(maps[held], grids[held])
        out.append({value: neighbours.organ_box(value, threshold) for value in values})
    return out


def calibrate_transfer_alpha(boxes: list[np.ndarray], masks: list, target: float = 0.99) -> float | None:
    """Leave-one-shot-out enlargement: the largest alpha that brings each held-out shot's box (from
    :func:`held_out_boxes`, with the caller's fallback where it found none) to ``target`` recall of that shot's
    mask. None when there are no held-out boxes. A mask needs only ``shape`` and indexing by a box (a CroppedMask
    will do)."""
    return alpha_over_shots(boxes, masks, target, None) if boxes else None
