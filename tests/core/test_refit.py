"""The refit on perturbed inputs (SolverConfig.refit_input_noise, spap.core.refit.perturbed_rows)."""

from __future__ import annotations

import pytest
import torch

from spap.core import MLPWeights, SolverConfig, prune_mlp
from spap.core.refit import perturbed_rows

from .test_linalg_stats import random_mlp
from .test_solver import output_error as relative_error
from .test_solver import stats_for


def nearly_low_rank_inputs(n: int, d: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g) + 0.05 * torch.randn(n, d, generator=g)


def refit(mlp: MLPWeights, x: torch.Tensor, sigma: float, sample_x: torch.Tensor | None = None) -> MLPWeights:
    stats = stats_for(mlp, x, sample=x.shape[0])
    cfg = SolverConfig(method="spap", refit_input_noise=sigma, refit_rounds=6)
    return prune_mlp(mlp, stats, 16, cfg, stats.sample_inputs() if sample_x is None else sample_x).weights


def test_perturbed_rows_are_seeded_and_scaled_by_each_rows_rms():
    x = torch.randn(4000, 64) * torch.linspace(0.1, 10, 4000)[:, None]  # rows of very different norms
    assert perturbed_rows(x, 0.0) is x
    noisy = perturbed_rows(x, 0.2, seed=3)
    assert torch.equal(noisy, perturbed_rows(x, 0.2, seed=3))
    assert not torch.equal(noisy, perturbed_rows(x, 0.2, seed=4))
    ratio = (noisy - x).pow(2).mean(-1) / x.pow(2).mean(-1)  # per row: sigma^2 times a chi^2_64 / 64
    assert abs(float(ratio.mean()) - 0.04) < 0.002
    assert float(ratio.std()) < 0.02  # the same relative size in small and large rows


def test_noisy_refit_fits_the_dense_mlp_at_the_perturbed_rows():
    """sigma > 0 equals a clean refit handed the perturbed rows: the noise reaches the inputs and the
    targets are the dense MLP there (not at the clean rows)."""
    mlp = random_mlp(d=16, m=40, seed=1)
    x = torch.randn(800, 16)
    noisy = refit(mlp, x, 0.3)
    by_hand = refit(mlp, x, 0.0, sample_x=perturbed_rows(x, 0.3))
    torch.testing.assert_close(noisy.up, by_hand.up, rtol=0, atol=0)
    torch.testing.assert_close(noisy.down, by_hand.down, rtol=0, atol=0)
    assert not torch.equal(noisy.up, refit(mlp, x, 0.0).up)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_refit_matches_the_dense_response_off_the_calibration_inputs(seed):
    """Inputs near a rank-4 subspace of R^16: the clean refit is free off the subspace, the noisy one
    is fitted there too, so on fresh perturbations of the inputs it has the lower error (measured
    about half; asserted below 3/4)."""
    mlp = random_mlp(d=16, m=40, seed=seed)
    x = nearly_low_rank_inputs(1500, 16, rank=4, seed=100 + seed)
    fresh = perturbed_rows(x, 0.5, seed=99)
    clean, noisy = refit(mlp, x, 0.0), refit(mlp, x, 0.5)
    assert relative_error(mlp, noisy, fresh) < 0.75 * relative_error(mlp, clean, fresh)
    assert relative_error(mlp, clean, x) < relative_error(mlp, noisy, x)  # the price: the clean rows fit less closely


def test_negative_or_nan_noise_is_rejected():
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="refit_input_noise"):
            SolverConfig(method="spap", refit_input_noise=bad)
