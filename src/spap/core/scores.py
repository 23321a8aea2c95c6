"""Neuron importance scores (higher = more important = kept).

All scores are functions of the down projection W (d, m) (fc2 for OPT) and statistics of its input z:

* ``magnitude`` ||W[:, i]||_2                        -- column norm (Li et al., 2017, "Pruning filters").
* ``wanda-sp``  mean_r |W[r, i]| * ||z_i||_2          -- structured Wanda (Sun et al., 2023; as the
                 "Wanda-sp" baseline of An et al., 2024, FLAP).
* ``fasp``      sum_r |W[r, i]| * ||z_i||_2           -- FASP's column-summed Wanda score (Hu et al., 2025).
* ``flap``      Var_n(z_i) * ||W[:, i]||^2            -- FLAP's fluctuation metric (An et al., 2024, AAAI).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .stats import MLPStatistics

SCORE_RULES = ("magnitude", "wanda-sp", "fasp", "flap")


def neuron_scores(rule: str, down: Tensor, stats: MLPStatistics) -> Tensor:
    """Importance (m,) in float64 of each neuron under ``rule``."""
    w = down.double()
    z_sq = stats.gram.diagonal().clamp_min(0)  # ||z_i||^2 = G_ii
    if rule == "magnitude":
        return w.norm(dim=0)
    if rule == "wanda-sp":
        return w.abs().mean(0) * z_sq.sqrt()
    if rule == "fasp":
        return w.abs().sum(0) * z_sq.sqrt()
    if rule == "flap":
        return stats.z_var * w.pow(2).sum(0)
    raise ValueError(f"unknown score rule {rule!r}; choose one of {', '.join(SCORE_RULES)}")


def bottom_k(scores: Tensor, k: int) -> Tensor:
    """Bool mask (m,) marking the k lowest scores (ties broken by index, deterministic)."""
    mask = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.sort(scores, stable=True).indices[:k]] = True
    return mask
