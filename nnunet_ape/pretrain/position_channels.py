"""APE loss on views that carry their voxels' positions as channels (the nnU-Net pretraining trainer's batches).

There each view comes out of nnU-Net's augmentation with 4 extra channels: the position of every voxel in mm (3)
and 1 where the voxel lies inside the scan (0 in padding). Rotation and scaling are affine and trilinear
interpolation reproduces a linear function exactly, so each view's positions are an affine function of its voxel
indices wherever it is inside the scan. Inverting that function in a view's partner finds the same physical points
there: the positive pairs of the paper's equivariance loss.
"""

from __future__ import annotations

import torch

from nnunet_ape.pretrain.loss import loss_from_points, sample_embeddings

INSIDE = 0.999  # a voxel counts as inside the scan when its (interpolated) inside channel is at least this
MIN_POINTS = 8  # a pair whose views share fewer points is left out of the batch


def has_points_inside(target: torch.Tensor) -> bool:
    """True when some view of ``target`` ``(V, 4, X, Y, Z)`` has at least MIN_POINTS voxels inside its scan: the
    batches :func:`position_channel_loss` has a loss for (it raises on the others)."""
    return bool(((target[:, 3] >= INSIDE).flatten(1).sum(1) >= MIN_POINTS).any())


def affine_fit(positions: torch.Tensor, inside: torch.Tensor, samples: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares ``position = index @ A + t`` of one view: positions ``(3, X, Y, Z)`` mm, inside ``(X, Y, Z)``
    bool. Returns ``A (3, 3)`` and ``t (3,)`` (float64), fitted on at most ``samples`` inside voxels."""
    index = torch.nonzero(inside)
    if len(index) > samples:
        index = index[torch.randperm(len(index), device=index.device)[:samples]]
    values = positions[:, index[:, 0], index[:, 1], index[:, 2]].T.double()
    design = torch.cat([index.double(), torch.ones(len(index), 1, dtype=torch.float64, device=index.device)], 1)
    solution = torch.linalg.lstsq(design.cpu(), values.cpu()).solution.to(positions.device)
    return solution[:3], solution[3]


def random_inside_voxels(inside: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` random voxel indices ``(k, 3)`` (float32, with repetition when fewer) where ``inside (X, Y, Z)`` holds."""
    index = torch.nonzero(inside)
    return index[torch.randint(len(index), (k,), device=index.device)].float()


def matched_points(target: torch.Tensor, k: int) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Positive pairs of each view pair of a batch.

    target: ``(V, 4, X, Y, Z)`` (positions mm, inside) of views 0/1, 2/3, ...; k: points drawn per pair in its first
    view. Returns per pair with at least MIN_POINTS shared points ``(pair index, coords_first (n, 3), coords_second
    (n, 3), positions (n, 3))``: continuous voxel indices in each view and the points' positions in mm.
    """
    pairs = []
    for pair, (first, second) in enumerate(zip(target[0::2], target[1::2])):
        inside_first, inside_second = first[3] >= INSIDE, second[3] >= INSIDE
        if inside_first.sum() < MIN_POINTS or inside_second.sum() < MIN_POINTS:
            continue
        coords_first = random_inside_voxels(inside_first, k)
        index = coords_first.long()
        positions = first[:3, index[:, 0], index[:, 1], index[:, 2]].T.float()
        matrix, offset = affine_fit(second[:3], inside_second)
        coords_second = ((positions.double() - offset) @ torch.linalg.inv(matrix)).float()
        size = torch.tensor(second.shape[1:], device=target.device, dtype=torch.float32)
        within = ((coords_second >= 0) & (coords_second <= size - 1)).all(1)
        inside_there = sample_embeddings(second[None, 3:4], coords_second[None])[0, :, 0] >= INSIDE
        keep = within & inside_there
        if keep.sum() >= MIN_POINTS:
            pairs.append((pair, coords_first[keep], coords_second[keep], positions[keep]))
    return pairs


def single_view_points(target: torch.Tensor, k: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per view of ``target (V, 4, X, Y, Z)`` that lies inside its scan: its index, ``k`` random inside voxels
    ``(k, 3)`` and their positions ``(k, 3)`` mm (the naive variant: no pairs)."""
    out = []
    for i, view in enumerate(target):
        inside = view[3] >= INSIDE
        if inside.sum() < MIN_POINTS:
            continue
        coords = random_inside_voxels(inside, k)
        index = coords.long()
        out.append((i, coords, view[:3, index[:, 0], index[:, 1], index[:, 2]].T.float()))
    return out


def position_channel_loss(
    embeddings: torch.Tensor, target: torch.Tensor, variant: str, points: int = 8000, equiv_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """The paper's loss (:func:`nnunet_ape.pretrain.loss.loss_from_points`) of one batch of position-carrying views.

    embeddings: ``(V, 3, X, Y, Z)`` network output; target: ``(V, 4, X, Y, Z)`` as in :func:`matched_points`, all
    views from one CT (one frame of positions); points: N of the paper, spread over the batch's pairs (views for the
    naive variant). Pairs without shared points fall back to the naive loss on their views.
    """
    def read(view: int, coords: torch.Tensor) -> torch.Tensor:
        return sample_embeddings(embeddings[view : view + 1], coords[None])[0]

    if variant != "naive":
        pairs = matched_points(target, max(1, points // max(1, len(target) // 2)))
        if pairs:
            a = torch.cat([read(2 * pair, first) for pair, first, _, _ in pairs])
            b = torch.cat([read(2 * pair + 1, second) for pair, _, second, _ in pairs])
            positions = torch.cat([p for _, _, _, p in pairs])
            return loss_from_points(a, b, positions, variant, equiv_weight)
    views = single_view_points(target, max(1, points // len(target)))
    if not views:
        raise ValueError("no view of this batch lies inside its scan (check has_points_inside before)")
    a = torch.cat([read(view, coords) for view, coords, _ in views])
    return loss_from_points(a, a, torch.cat([p for _, _, p in views]), "naive")
