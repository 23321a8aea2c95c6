import math

import pytest
import torch

from spap.core import allocation


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.77])
@pytest.mark.parametrize("temperature", [0.05, 0.5, 1.0, 10.0])
def test_energy_softmax_budget_is_exact_and_within_bounds(sparsity, temperature):
    widths = [100, 120, 100, 80, 100, 64]
    energies = [0.5, 3.0, 1.0, 0.1, 2.0, 0.7]
    counts = allocation.energy_softmax(widths, energies, sparsity, temperature, min_sparsity=0.05, max_sparsity=0.9)
    assert sum(counts) == round(sparsity * sum(widths))
    for k, m in zip(counts, widths):
        assert int(0.05 * m) <= k <= min(m - 1, -(-9 * m // 10)) and m - k >= 1


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0, 3.0])
def test_more_important_layer_never_keeps_fewer_neurons(temperature):
    g = torch.Generator().manual_seed(0)
    energies = torch.rand(12, generator=g).tolist()
    widths = [256] * 12
    counts = allocation.energy_softmax(widths, energies, 0.4, temperature)
    kept = [m - k for m, k in zip(widths, counts)]
    for i in range(12):
        for j in range(12):
            if energies[i] > energies[j]:
                assert kept[i] >= kept[j], (i, j, kept)


def test_temperature_limits():
    widths, energies = [100] * 4, [1.0, 2.0, 3.0, 4.0]
    assert allocation.energy_softmax(widths, energies, 0.3, temperature=1e6) == [30] * 4  # uniform
    greedy = allocation.energy_softmax(widths, energies, 0.3, temperature=1e-3, max_sparsity=0.9)
    assert greedy == [90, 30, 0, 0]  # budget to the least important layers first, up to the cap


def test_infeasible_bounds_raise():
    with pytest.raises(ValueError, match="bounds"):
        allocation.energy_softmax([10, 10], [1, 1], 0.5, max_sparsity=0.2)


def test_global_ranking_standardises_per_layer():
    # Layer 0 has huge raw scores, layer 1 tiny ones: after standardisation they are comparable.
    s0 = torch.arange(10.0) * 1000
    s1 = torch.arange(10.0) * 0.001
    counts = allocation.global_ranking([s0, s1], 0.5)
    assert counts == [5, 5] and sum(counts) == 10
    skewed = allocation.global_ranking([torch.tensor([0.0, 1, 2, 3, 100]), torch.arange(5.0)], 0.4)
    assert skewed == [2, 2]  # z-scores: layer 0 [-.48, -.46, -.44, -.41, 1.79], layer 1 [-1.26, -.63, 0, ...]


def test_rounding_preserves_order_and_total():
    values = [3.1, 3.05, 2.9, 0.95]
    counts = allocation.round_preserving_sum(values, 10, [0] * 4, [10] * 4)
    assert sum(counts) == 10
    assert counts == sorted(counts, reverse=True)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3, 0.5, 0.9])
def test_uniform_rounding_gives_every_layer_the_same_aligned_width(sparsity):
    widths = [1536] * 5 + [14336] * 2
    counts = allocation.uniform(widths, sparsity, multiple=64)
    kept = [m - k for m, k in zip(widths, counts)]
    assert len(set(kept[:5])) == 1 and len(set(kept[5:])) == 1
    for m, k in zip(widths, kept):
        assert k == m or k % 64 == 0
        assert abs(k - (m - round(sparsity * m))) <= 32
    assert allocation.uniform([14336], 0.3, 64) == [14336 - 10048]
    assert allocation.uniform(widths, sparsity, 1) == [round(sparsity * m) for m in widths]


def reference_cfsp_keep_ratios(distances, sparsity, tokens=128 * 2048):
    """CFSP's reference rule on the per-layer sums of angular distance over ``tokens`` tokens."""
    sums = [d * tokens for d in distances]
    mid = sum(sums) / len(sums)
    s = [1 / (1 + math.exp(-(v - mid) / 1e4)) for v in sums]
    avg, top = sum(s) / len(s), max(s)
    if top / avg * (1 - sparsity) >= 1:
        scale = (avg * (1 / (1 - sparsity) - 1)) / (top - avg) / 1.05
        s = [avg + (v - avg) * scale for v in s]
        avg = sum(s) / len(s)
    return [v / avg * (1 - sparsity) for v in s]


@pytest.mark.parametrize("sparsity", [0.2, 0.3, 0.5])
def test_angular_allocation_matches_cfsp_reference_at_its_calibration_size(sparsity):
    distances = [0.30, 0.12, 0.08, 0.06, 0.05, 0.05, 0.06, 0.07, 0.09, 0.15]
    widths = [1536] * len(distances)
    counts = allocation.angular_sigmoid(widths, distances, sparsity)
    expected_kept = [r * 1536 for r in reference_cfsp_keep_ratios(distances, sparsity)]
    assert sum(counts) == round(sparsity * sum(widths))
    for k, kept in zip(counts, expected_kept):
        assert abs((1536 - k) - kept) <= 1.0
    assert len(set(counts)) > 3  # the rule is not uniform on these distances


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.6])
def test_angular_allocation_budget_bounds_and_order(sparsity):
    g = torch.Generator().manual_seed(1)
    distances = (torch.rand(16, generator=g) * 0.4).tolist()
    widths = [512] * 16
    counts = allocation.angular_sigmoid(widths, distances, sparsity, min_sparsity=0.02, max_sparsity=0.95)
    assert sum(counts) == round(sparsity * sum(widths))
    kept = [m - k for m, k in zip(widths, counts)]
    assert all(int(0.02 * 512) <= k <= min(511, math.ceil(0.95 * 512)) for k in counts)
    for i in range(16):
        for j in range(16):
            if distances[i] > distances[j]:
                assert kept[i] >= kept[j]  # a block that turns the residual stream more keeps more


def test_angular_allocation_limits():
    assert allocation.angular_sigmoid([100] * 4, [0.1] * 4, 0.3) == [30] * 4  # equal angles: uniform
    assert allocation.angular_sigmoid([100] * 4, [0.1, 0.2, 0.3, 0.4], 0.0) == [0] * 4
    flat = allocation.angular_sigmoid([1000] * 4, [0.1, 0.2, 0.3, 0.4], 0.3, slope=1e-6)
    assert max(flat) - min(flat) <= 1  # a vanishing slope is uniform
    with pytest.raises(ValueError, match="slope"):
        allocation.angular_sigmoid([10, 10], [0.1, 0.2], 0.3, slope=0)
