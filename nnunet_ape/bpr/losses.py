"""BPR losses: Yan et al. 2018 (order and distance) and the reference implementation's heuristic order loss.

All take the scores of the m slices sampled from one CT, ordered from feet to head: ``scores`` ``(m,)`` or
``(B, m)`` for B CTs, and where needed the slices' z positions in mm, same shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def order_loss(scores: torch.Tensor) -> torch.Tensor:
    """Yan's order loss: ``-mean log sigmoid(s_{i+1} - s_i)``, small when scores increase from feet to head."""
    return -F.logsigmoid(scores.diff(dim=-1)).mean()


def distance_loss(scores: torch.Tensor) -> torch.Tensor:
    """Yan's distance loss for equidistant slices: equal gaps give equal score steps,
    ``mean smoothL1(d_{i+1} - d_i)`` with ``d_i = s_{i+1} - s_i``."""
    steps = scores.diff(dim=-1)
    change = steps.diff(dim=-1)
    return F.smooth_l1_loss(change, torch.zeros_like(change))


def heuristic_order_loss(scores: torch.Tensor, z_mm: torch.Tensor, alpha: float = 1.0, beta: float = 0.02) -> torch.Tensor:
    """The reference implementation's heuristic: ``MSE(sigmoid(alpha * dScore), sigmoid(beta * dZ_mm))`` over all
    slice pairs of a CT, so score differences follow z differences in sign and (saturating) size."""
    d_score = scores.unsqueeze(-1) - scores.unsqueeze(-2)
    d_z = z_mm.unsqueeze(-1) - z_mm.unsqueeze(-2)
    return F.mse_loss(torch.sigmoid(alpha * d_score), torch.sigmoid(beta * d_z))
