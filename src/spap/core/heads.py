"""Group-structured SPAP for attention heads.

The attention output projection computes y = W_o a + b with a = [a_1; ...; a_H] the concatenated
head outputs (head_dim each).  Removing a KV group removes the o_proj column blocks of all query
heads sharing that KV head (and the matching rows of q/k/v), so the problem is SPAP's with column
groups instead of single neurons (see ``selection.compensated_importance``); W_o is then re-fit in
closed form on the kept columns from the same statistics G = sum a a^T, C = sum y a^T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .linalg import QuadraticLS
from .selection import penalty_select, score_select
from .solver_config import SolverConfig
from .stats import MLPStatistics


@dataclass
class HeadPruneResult:
    keep_groups: list[int]  # KV groups kept (sorted)
    o_weight: Tensor  # (d, kept columns) float32
    o_bias: Tensor | None
    error: float  # relative error of the attention output on the calibration tokens


def column_groups(n_heads: int, n_kv_heads: int, head_dim: int) -> Tensor:
    """KV-group id of every o_proj input column: query head h uses KV head h // (n_heads / n_kv)."""
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv_heads} KV heads evenly")
    per_group = n_heads // n_kv_heads
    return torch.arange(n_heads * head_dim) // (head_dim * per_group)


def prune_kv_groups(
    o_weight: Tensor, o_bias: Tensor | None, stats: MLPStatistics, groups: Tensor, n_prune: int, cfg: SolverConfig
) -> HeadPruneResult:
    """Choose ``n_prune`` KV groups to remove (SPAP penalty loop over groups) and re-fit W_o."""
    n_groups = int(groups.max()) + 1
    if not 0 <= n_prune < n_groups:
        raise ValueError(f"cannot prune {n_prune} of {n_groups} KV groups")
    fit_bias = o_bias is not None
    problem = QuadraticLS.from_stats(stats)
    selection_problem = problem.centered() if fit_bias else problem
    if cfg.selection_rule == "penalty":
        pruned, _ = penalty_select(selection_problem, n_prune, cfg, groups)
    else:
        pruned = score_select(selection_problem, n_prune, cfg, groups)
    keep_groups = [g for g in range(n_groups) if not bool(pruned[g])]
    columns = torch.nonzero(torch.isin(groups, torch.tensor(keep_groups))).flatten()
    sub = problem.restrict(columns)
    w, b = sub.solve(cfg.damping * problem.mean_diag, fit_bias=fit_bias)
    error = sub.relative_error(w, b)
    return HeadPruneResult(keep_groups, w.float().cpu(), None if b is None else b.float().cpu(), error)
