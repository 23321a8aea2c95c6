"""Splitting a global neuron budget across layers.

Given layer widths m_l and a global sparsity q, remove K = round(q * sum_l m_l) neurons in total,
k_l from layer l, with bounds  floor(min_sparsity * m_l) <= k_l <= ceil(max_sparsity * m_l)
(max_sparsity < 1, so no layer is emptied).

``uniform``           k_l = round(q m_l).
``global_ranking``    FLAP: standardise each layer's neuron scores (z-score within the layer), pool
                      all layers and remove the K lowest (An et al., 2024).
``energy_softmax``    StructPrune-style closed form.  Linearise each layer's cost of pruning a fraction
                      p_l of the budget as E_l * p_l (E_l: layer energy = importance, normalised to
                      mean 1) and regularise the allocation with its KL divergence from the uniform
                      allocation pi_l = m_l / sum m:
                          min_p  sum_l E_l p_l + T sum_l p_l log(p_l / pi_l)   s.t. sum p_l = 1
                      =>  p_l = pi_l exp(-E_l / T) / sum_j pi_j exp(-E_j / T)      (softmax),
                      k_l = K p_l, with the bounds enforced by fixing violators at their bound and
                      re-solving for the rest.  T -> inf recovers uniform; T -> 0 sends the budget to
                      the least important layers (the dual-decomposition / Lagrangian solution of the
                      linearised problem).  Derivation and validation: docs/structprune.md.
``angular_sigmoid``   CFSP's coarse (inter-block) allocation (Wang et al., 2024): layers whose block
                      turns the residual stream more keep more neurons, keep ratio proportional to
                      sigmoid(slope * (d_l - mean d)), d_l the block's mean angular distance.
Integer counts use largest-remainder rounding, which keeps the total exact and preserves order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _bounds(widths: list[int], min_sparsity: float, max_sparsity: float) -> tuple[list[int], list[int]]:
    if not 0 <= min_sparsity <= max_sparsity < 1:
        raise ValueError("need 0 <= min_sparsity <= max_sparsity < 1")
    lo = [math.floor(min_sparsity * m) for m in widths]
    hi = [min(m - 1, math.ceil(max_sparsity * m)) for m in widths]
    return lo, hi


def _feasible_budget(
    widths: list[int], sparsity: float, min_sparsity: float, max_sparsity: float
) -> tuple[int, list[int], list[int]]:
    """(K, lower bounds, upper bounds) for a global allocation; raises if the bounds cannot meet K."""
    total = global_budget(widths, sparsity)
    lo, hi = _bounds(widths, min_sparsity, max_sparsity)
    if not sum(lo) <= total <= sum(hi):
        raise ValueError(f"budget {total} is outside the per-layer bounds [{sum(lo)}, {sum(hi)}]")
    return total, lo, hi


def global_budget(widths: list[int], sparsity: float) -> int:
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return int(round(sparsity * sum(widths)))


def uniform(widths: list[int], sparsity: float, multiple: int = 1) -> list[int]:
    """k_l = round(sparsity * m_l); with ``multiple`` > 1 the kept width m_l - k_l is rounded to the
    nearest multiple (at least one multiple, at most m_l), so layers of equal width keep equal widths
    and a stock config (one ``intermediate_size``) can describe the result."""
    counts = []
    for m in widths:
        k = int(round(sparsity * m))
        if multiple > 1 and k > 0:
            k = m - min(m, max(multiple, int(round((m - k) / multiple)) * multiple))
        counts.append(k)
    return counts


def round_preserving_sum(values: list[float], total: int, lo: list[int], hi: list[int]) -> list[int]:
    """Integers within [lo, hi] summing to ``total``, closest to ``values`` (largest remainder)."""
    counts = [min(max(math.floor(v), a), b) for v, a, b in zip(values, lo, hi)]
    missing = total - sum(counts)
    order = sorted(range(len(values)), key=lambda i: (-(values[i] - math.floor(values[i])), i))
    step = 1 if missing > 0 else -1
    if missing < 0:
        order = order[::-1]
    while missing != 0:
        moved = False
        for i in order:
            if missing == 0:
                break
            if lo[i] <= counts[i] + step <= hi[i]:
                counts[i] += step
                missing -= step
                moved = True
        if not moved:
            raise ValueError("budget cannot be met within the per-layer bounds")
    return counts


def energy_softmax(
    widths: list[int],
    energies: list[float],
    sparsity: float,
    temperature: float = 1.0,
    min_sparsity: float = 0.0,
    max_sparsity: float = 0.9,
) -> list[int]:
    """StructPrune-style allocation: k_l proportional to pi_l exp(-E_l / T), within bounds, summing to K."""
    if len(widths) != len(energies):
        raise ValueError("one energy per layer is needed")
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    total, lo, hi = _feasible_budget(widths, sparsity, min_sparsity, max_sparsity)
    e = torch.tensor(energies, dtype=torch.float64)
    e = e / e.mean().clamp_min(1e-30)
    logits = torch.log(torch.tensor(widths, dtype=torch.float64)) - e / temperature
    fixed: dict[int, float] = {}
    for _ in range(len(widths) + 1):
        free = [i for i in range(len(widths)) if i not in fixed]
        remaining = total - sum(fixed.values())
        weights = torch.softmax(logits[free], dim=0)
        values = {i: float(remaining * w) for i, w in zip(free, weights)}
        violators = {i: (lo[i] if v < lo[i] else hi[i]) for i, v in values.items() if v < lo[i] or v > hi[i]}
        if not violators:
            break
        fixed.update(violators)
    raw = [fixed.get(i, values.get(i, 0.0)) for i in range(len(widths))]
    return round_preserving_sum(raw, total, lo, hi)


CFSP_SLOPE = 128 * 2048 / 1e4
"""CFSP's reference sums the angular distance over its 128 x 2048 calibration tokens and divides the
centred sums by 1e4 before a sigmoid of slope a = 1.  On per-token means that is a slope of
128 * 2048 / 1e4 = 26.2144, which reproduces its allocation at the paper's calibration size and does
not change with the number of calibration tokens (the reference's would)."""


def angular_sigmoid(
    widths: list[int],
    distances: list[float],
    sparsity: float,
    slope: float = CFSP_SLOPE,
    min_sparsity: float = 0.0,
    max_sparsity: float = 0.9,
) -> list[int]:
    """CFSP allocation: prune counts k_l from per-layer angular distances d_l = mean_n arccos(cos(h_in, h_out)) / pi.

    s_l = sigmoid(slope (d_l - mean d)); when the most important layer would keep more than all of its
    neurons, the deviations s_l - mean s are shrunk until its keep ratio is (1 - q) + q / 1.05 (the
    reference's rule); keep ratio r_l = (1 - q) s_l / mean s, k_l proportional to m_l (1 - r_l), scaled
    to the budget K = round(q sum m) and rounded within the per-layer bounds.
    """
    if len(widths) != len(distances):
        raise ValueError("one angular distance per layer is needed")
    if slope <= 0:
        raise ValueError("the angular allocation's slope must be > 0")
    total, lo, hi = _feasible_budget(widths, sparsity, min_sparsity, max_sparsity)
    if total == 0:
        return [0] * len(widths)
    d = torch.tensor(distances, dtype=torch.float64)
    s = torch.sigmoid(slope * (d - d.mean()))
    avg, top = s.mean(), s.max()
    if top / avg * (1 - sparsity) >= 1:
        s = avg + (s - avg) * (avg * (1 / (1 - sparsity) - 1) / (top - avg) / 1.05)
    keep_ratio = (1 - sparsity) * s / s.mean()
    raw = torch.tensor(widths, dtype=torch.float64) * (1 - keep_ratio)
    raw = raw * (total / raw.sum().clamp_min(1e-30))
    return round_preserving_sum(raw.tolist(), total, lo, hi)


def global_ranking(
    scores: list[Tensor], sparsity: float, min_sparsity: float = 0.0, max_sparsity: float = 0.9
) -> list[int]:
    """FLAP: remove the K globally lowest per-layer-standardised scores, within the per-layer bounds."""
    widths = [s.numel() for s in scores]
    total = global_budget(widths, sparsity)
    lo, hi = _bounds(widths, min_sparsity, max_sparsity)
    standardized = [(s.double() - s.double().mean()) / s.double().std().clamp_min(1e-30) for s in scores]
    pooled = torch.cat(standardized)
    layer_of = torch.cat([torch.full((m,), i) for i, m in enumerate(widths)])
    counts = list(lo)
    # neurons forced out by the lower bounds are each layer's lowest; then fill by global order
    rank_in_layer = torch.cat([torch.argsort(torch.argsort(s)) for s in standardized])
    for idx in torch.argsort(pooled).tolist():
        if sum(counts) >= total:
            break
        layer = int(layer_of[idx])
        if int(rank_in_layer[idx]) >= counts[layer] and counts[layer] < hi[layer]:
            counts[layer] += 1
    return counts


def round_kept_to_multiple(widths: list[int], counts: list[int], multiple: int) -> list[int]:
    """Adjust non-uniform prune counts so every kept width is a multiple of ``multiple`` (or the full
    width), keeping the total kept as close as possible to the original total (so layers may end up
    with different widths; ``uniform(..., multiple)`` is the rounding for uniform allocations)."""
    if multiple <= 1:
        return list(counts)
    ideal = [m - k for m, k in zip(widths, counts)]
    kept = [min(m, max(multiple, round(v / multiple) * multiple)) for v, m in zip(ideal, widths)]
    target = sum(ideal)
    while True:  # move whole multiples where they reduce |sum(kept) - target| most fairly
        excess = sum(kept) - target
        if abs(excess) <= multiple // 2:
            break
        step = -multiple if excess > 0 else multiple
        candidates = [i for i, m in enumerate(widths) if multiple <= kept[i] + step <= m]
        if not candidates:
            break
        i = max(candidates, key=lambda j: (kept[j] - ideal[j]) * (1 if step < 0 else -1))
        kept[i] += step
    return [m - k for m, k in zip(widths, kept)]
