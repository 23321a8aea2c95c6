"""Neuron importance scores (higher = more important = kept).

All scores are functions of the down projection W (d, m) (fc2 for OPT) and statistics of its input z:

* ``magnitude`` ||W[:, i]||_2                        -- column norm (Li et al., 2017, "Pruning filters").
* ``wanda-sp``  mean_r |W[r, i]| * ||z_i||_2          -- structured Wanda (Sun et al., 2023; as the
                 "Wanda-sp" baseline of An et al., 2024, FLAP).
* ``fasp``      sum_r |W[r, i]| * ||z_i||_2           -- FASP's column-summed Wanda score (Hu et al., 2025).
* ``flap``      Var_n(z_i) * ||W[:, i]||^2            -- FLAP's fluctuation metric (An et al., 2024, AAAI).
* ``cfsp``      ||z_i||_2                             -- CFSP's fine-grained (intra-block) score as its
                 reference code computes it (Wang et al., 2024, arXiv 2409.13199; wyxscir/CFSP, local
                 metric ``three_w_one_wa`` with b = c = 1): mean_r (|W_down[r, i]| a_i / sum_r' |W_down[r', i]| a_i
                 + |W_up[i, r]| / sum_r' |W_up[i, r']| + |W_gate[i, r]| / sum_r' |W_gate[i, r']|) * a_i with
                 a_i = ||z_i|| / sqrt(n_seq).  Each weight term is normalised over the same index the mean
                 runs over, so the bracket is 3/d for every neuron and the score ranks neurons by ||z_i||
                 alone (tests/core/test_solver.py checks the equivalence).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .methods import Method, get_method, register
from .stats import MLPStatistics


def _magnitude(w: Tensor, stats: MLPStatistics) -> Tensor:
    return w.norm(dim=0)


def _wanda_sp(w: Tensor, stats: MLPStatistics) -> Tensor:
    return w.abs().mean(0) * _z_norm(stats)


def _fasp(w: Tensor, stats: MLPStatistics) -> Tensor:
    return w.abs().sum(0) * _z_norm(stats)


def _flap(w: Tensor, stats: MLPStatistics) -> Tensor:
    return stats.z_var * w.pow(2).sum(0)


def _cfsp(w: Tensor, stats: MLPStatistics) -> Tensor:
    return _z_norm(stats)


def _z_norm(stats: MLPStatistics) -> Tensor:
    return stats.z_sq.clamp_min(0).sqrt()  # ||z_i|| = sqrt(G_ii)


register(Method("magnitude", "score", "none", score=_magnitude, summary="column norm of W_down"))
register(Method("wanda-sp", "score", "none", score=_wanda_sp, summary="structured Wanda (FLAP's Wanda-sp)"))
register(Method("fasp", "score", "ls", score=_fasp, summary="FASP: Wanda score, closed-form W_down"))
register(Method("flap", "score", "bias", "global", _flap, "FLAP: fluctuation, global ranking, bias compensation"))
# CFSP's recovery fine-tuning (LoRA) is training, not part of the harness
register(Method("cfsp", "score", "none", "angular", _cfsp, "CFSP: activation norm, angular allocation"))
SCORE_RULES = ("magnitude", "wanda-sp", "fasp", "flap", "cfsp")


def neuron_scores(rule: str, down: Tensor, stats: MLPStatistics) -> Tensor:
    """Importance (m,) in float64 of each neuron under the score of method ``rule``."""
    score = get_method(rule).score
    if score is None:
        raise ValueError(f"method {rule!r} has no neuron score; choose one of {', '.join(SCORE_RULES)}")
    return score(down.double(), stats)


def bottom_k(scores: Tensor, k: int, blocks: Tensor | None = None) -> Tensor:
    """Bool mask (m,) marking the k lowest scores (ties broken by index, deterministic); with
    ``blocks`` (m,) of block ids, the k lowest within every block."""
    mask = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    if k <= 0:
        return mask
    if blocks is None:
        mask[torch.sort(scores, stable=True).indices[:k]] = True
        return mask
    return first_k_per_block(torch.sort(scores, stable=True).indices, k, blocks)


def first_k_per_block(order: Tensor, k: int, blocks: Tensor) -> Tensor:
    """Bool mask (m,) marking, in every block, the first k units of ``order`` (a permutation of m)."""
    blocks = blocks.to(order.device)
    mask = torch.zeros(order.shape[0], dtype=torch.bool, device=order.device)
    taken: dict[int, int] = {}
    for unit in order.tolist():
        block = int(blocks[unit])
        if taken.get(block, 0) < k:
            taken[block] = taken.get(block, 0) + 1
            mask[unit] = True
    return mask
