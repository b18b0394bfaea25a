"""APE losses exactly as the paper (DESIGN section 2): distance matching and equivariance."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_distances(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Euclidean distances ``(N, M)`` between rows of ``a`` ``(N, C)`` and ``b`` ``(M, C)``, float32.

    Uses ``|a|^2 + |b|^2 - 2ab`` (no ``(N, M, C)`` intermediate); ``eps`` keeps the gradient finite at 0.
    """
    a, b = a.float(), b.float()
    squared = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None] - 2.0 * a @ b.T
    return squared.clamp_min(eps).sqrt()


def normalize_positions(positions: torch.Tensor) -> torch.Tensor:
    """Positions ``(N, 3)`` mm -> ``p^`` of the paper: zero mean and unit std per axis over the batch.

    Per axis, like the non-affine BatchNorm that normalizes each embedding channel over the batch.
    """
    positions = positions.float()
    return (positions - positions.mean(0)) / positions.std(0, correction=0).clamp_min(1e-6)


def distance_loss(a: torch.Tensor, b: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``L_dist = mean_ij (||a_i - b_j|| - ||p^_i - p^_j||)^2``.

    a, b: ``(N, 3)`` embeddings (b = a for the naive variant, the partner views' embeddings otherwise);
    positions: ``(N, 3)`` physical positions in mm of the N points (shared by a_i and b_i).
    """
    p = normalize_positions(positions)
    return (pairwise_distances(a, b) - pairwise_distances(p, p, eps=0.0)).pow(2).mean()


def equivariance_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``L_equiv = mean_i ||a_i - b_i||^2`` for positive pairs ``(N, 3)``."""
    return (a.float() - b.float()).pow(2).sum(1).mean()


def sample_embeddings(embeddings: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Trilinearly read maps ``(V, C, X, Y, Z)`` at continuous voxel indices ``(V, k, 3)`` -> ``(V, k, C)``."""
    size = torch.tensor(embeddings.shape[-3:], device=coords.device, dtype=torch.float32)
    normalized = 2.0 * coords / (size - 1).clamp_min(1) - 1.0
    grid = normalized.flip(-1)[:, :, None, None, :]  # grid_sample wants (z, y, x) for a (X, Y, Z) volume
    sampled = F.grid_sample(embeddings.float(), grid, mode="bilinear", align_corners=True)
    return sampled[:, :, :, 0, 0].transpose(1, 2)


def loss_from_points(
    a: torch.Tensor, b: torch.Tensor, positions: torch.Tensor, variant: str, equiv_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """The paper's loss of one batch from embeddings already read at its points, and its parts for logging.

    a, b: ``(N, 3)`` embeddings of N points in the first and the second view of their pair (the same tensor for the
    naive variant, which has no pairs); positions: ``(N, 3)`` their physical positions in mm, one frame per batch.
    """
    dist = distance_loss(a, b, positions)
    if variant in ("naive", "aug"):
        return dist, {"loss": dist.item(), "dist": dist.item()}
    equiv = equivariance_loss(a, b)
    loss = dist + equiv_weight * equiv
    return loss, {"loss": loss.item(), "dist": dist.item(), "equiv": equiv.item()}


def ape_loss(
    embeddings: torch.Tensor, coords: torch.Tensor, positions: torch.Tensor, variant: str, equiv_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of one batch and its parts for logging.

    embeddings: ``(V, 3, X, Y, Z)`` network output for the batch's views; coords, positions: as in
    :mod:`nnunet_ape.pretrain.batches`.
    """
    return ape_loss_at_points(sample_embeddings(embeddings, coords), positions, variant, equiv_weight)


def ape_loss_at_points(
    points: torch.Tensor, positions: torch.Tensor, variant: str, equiv_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`ape_loss` from the embeddings already read at the batch's coords: ``points`` ``(V, k, 3)``."""
    flat_positions = positions.reshape(-1, 3)
    if variant == "naive":
        a = points.reshape(-1, points.shape[-1])
        return loss_from_points(a, a, flat_positions, variant)
    a = points[0::2].reshape(-1, points.shape[-1])
    b = points[1::2].reshape(-1, points.shape[-1])
    return loss_from_points(a, b, flat_positions, variant, equiv_weight)
