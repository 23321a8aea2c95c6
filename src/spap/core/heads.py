"""Group-structured SPAP for attention heads.

The attention output projection computes y = W_o a + b with a = [a_1; ...; a_H] the concatenated
head outputs (head_dim each).  Removing a KV group removes the o_proj column blocks of all query
heads sharing that KV head (and the matching rows of q/k/v), so the problem is SPAP's with column
groups instead of single neurons (see ``selection.compensated_importance``); W_o is then re-fit in
closed form on the kept columns from the same statistics G = sum a a^T, C = sum y a^T.

Query-head pruning (``prune_query_heads``) removes the same number r of query heads from every KV
group instead: the units are single query heads (column blocks of head_dim), the top-k steps of
the selection pick r per KV group, and q_proj rows / o_proj columns go while k/v (and the KV cache)
stay, so every group still serves per_group - r query heads and the layer remains valid GQA.
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
    kept: list[int]  # units kept (sorted): KV groups, or query heads for prune_query_heads
    o_weight: Tensor  # (d, kept columns) float32
    o_bias: Tensor | None
    error: float  # relative error of the attention output on the calibration tokens


def column_groups(n_heads: int, n_kv_heads: int, head_dim: int) -> Tensor:
    """KV-group id of every o_proj input column: query head h uses KV head h // (n_heads / n_kv)."""
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv_heads} KV heads evenly")
    per_group = n_heads // n_kv_heads
    return torch.arange(n_heads * head_dim) // (head_dim * per_group)


def query_head_columns(n_heads: int, head_dim: int) -> Tensor:
    """Query-head id of every o_proj input column."""
    return torch.arange(n_heads * head_dim) // head_dim


def prune_kv_groups(
    o_weight: Tensor, o_bias: Tensor | None, stats: MLPStatistics, groups: Tensor, n_prune: int, cfg: SolverConfig
) -> HeadPruneResult:
    """Choose ``n_prune`` KV groups to remove (SPAP penalty loop over groups) and re-fit W_o."""
    n_groups = int(groups.max()) + 1
    if not 0 <= n_prune < n_groups:
        raise ValueError(f"cannot prune {n_prune} of {n_groups} KV groups")
    return _select_and_refit(o_weight, o_bias, stats, groups, n_prune, cfg, blocks=None)


def prune_query_heads(
    o_weight: Tensor,
    o_bias: Tensor | None,
    stats: MLPStatistics,
    n_heads: int,
    n_kv_heads: int,
    n_prune_per_group: int,
    cfg: SolverConfig,
) -> HeadPruneResult:
    """Choose ``n_prune_per_group`` query heads to remove from every KV group and re-fit W_o.

    o_weight: (d, n_heads * head_dim); query head h belongs to KV group h // (n_heads / n_kv_heads).
    """
    if n_heads % n_kv_heads or o_weight.shape[1] % n_heads:
        raise ValueError(
            f"o_proj with {o_weight.shape[1]} inputs cannot hold {n_heads} heads in {n_kv_heads} KV groups"
        )
    per_group = n_heads // n_kv_heads
    if not 0 <= n_prune_per_group < per_group:
        raise ValueError(f"cannot prune {n_prune_per_group} of the {per_group} query heads of each KV group")
    heads = query_head_columns(n_heads, o_weight.shape[1] // n_heads)
    kv_group_of_head = torch.arange(n_heads) // per_group
    return _select_and_refit(o_weight, o_bias, stats, heads, n_prune_per_group, cfg, blocks=kv_group_of_head)


def _select_and_refit(
    o_weight: Tensor,
    o_bias: Tensor | None,
    stats: MLPStatistics,
    groups: Tensor,
    n_prune: int,
    cfg: SolverConfig,
    blocks: Tensor | None,
) -> HeadPruneResult:
    """SPAP selection over column ``groups`` (n_prune in total, or per block), then closed-form W_o."""
    fit_bias = o_bias is not None
    problem = QuadraticLS.from_stats(stats)
    selection_problem = problem.centered() if fit_bias else problem
    if cfg.selection_rule == "penalty":
        pruned, _ = penalty_select(selection_problem, n_prune, cfg, groups, blocks)
    else:
        pruned = score_select(selection_problem, n_prune, cfg, groups, blocks)
    kept = [g for g in range(int(groups.max()) + 1) if not bool(pruned[g])]
    columns = torch.nonzero(torch.isin(groups, torch.tensor(kept))).flatten()
    sub = problem.restrict(columns)
    w, b = sub.solve(cfg.damping * problem.mean_diag, fit_bias=fit_bias)
    error = sub.relative_error(w, b)
    return HeadPruneResult(kept, w.float().cpu(), None if b is None else b.float().cpu(), error)
