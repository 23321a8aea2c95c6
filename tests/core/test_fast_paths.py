"""Speed-ups of the per-MLP solver against the computations they replace."""

from __future__ import annotations

import pytest
import torch

from spap.core import SolverConfig
from spap.core.linalg import QuadraticLS
from spap.core.refit import Holdout, alternating_refit
from spap.core.scores import bottom_k
from spap.core.selection import compensated_importance, penalty_select
from spap.core.stats import refit_token_positions, sample_token_positions

from .test_linalg_stats import random_mlp
from .test_solver import stats_for


def direct_penalty_select(problem: QuadraticLS, n_prune: int, cfg: SolverConfig) -> tuple[torch.Tensor, list[float]]:
    """The penalty loop as first written: factorise A = G + diag(delta + rho s) every round."""
    scale = problem.mean_diag
    damping = cfg.damping * scale
    s = torch.zeros(problem.gram.shape[0], dtype=torch.float64)
    rho, ramp_rounds, objective = cfg.rho_init * scale, max(1, round(cfg.ramp * cfg.penalty_rounds)), []
    for r in range(cfg.penalty_rounds):
        importance, w = compensated_importance(problem, rho * s, damping, cfg.score_exponent)
        k_r = min(n_prune, max(1, round(n_prune * (r + 1) / ramp_rounds)))
        s = (1 - cfg.momentum) * s + cfg.momentum * bottom_k(importance, k_r).double()
        objective.append(2 * problem.objective(w) / float(problem.y_sq))
        rho *= cfg.rho_growth
    by_importance = torch.sort(importance, stable=True).indices
    order = by_importance[torch.sort(-s[by_importance], stable=True).indices]
    mask = torch.zeros_like(s, dtype=torch.bool)
    mask[order[:n_prune]] = True
    return mask, objective


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_woodbury_penalty_loop_equals_the_direct_loop(seed):
    g = torch.Generator().manual_seed(seed)
    mlp = random_mlp(d=24, m=96, seed=seed)
    x = torch.randn(1500, 6, generator=g) @ torch.randn(6, 24, generator=g) + 0.2 * torch.randn(1500, 24, generator=g)
    problem = QuadraticLS.from_stats(stats_for(mlp, x))
    cfg = SolverConfig(penalty_patience=0)
    mask, trace = penalty_select(problem, 40, cfg)
    expected_mask, expected_objective = direct_penalty_select(problem, 40, cfg)
    assert torch.equal(mask, expected_mask)
    assert trace.objective == pytest.approx(expected_objective, rel=1e-9, abs=1e-12)
    # early stop once the full-size mask has settled: fewer rounds, the same mask here
    early_mask, early_trace = penalty_select(problem, 40, SolverConfig(penalty_patience=2))
    assert len(early_trace.objective) < cfg.penalty_rounds
    assert early_trace.objective == trace.objective[: len(early_trace.objective)]
    assert torch.equal(early_mask, expected_mask)


def test_holdout_positions_leave_the_fit_rows_unchanged():
    fit_only = sample_token_positions(1000, 100, seed=4)
    positions, holdout = refit_token_positions(1000, 100, 60, seed=4)
    assert torch.equal(positions[~holdout], fit_only)
    assert int(holdout.sum()) == 60 and positions.unique().numel() == 160
    assert torch.equal(positions, positions.sort().values)
    assert refit_token_positions(1000, 100, 0, seed=4)[1] is None


def test_refit_early_stopping_returns_the_best_held_out_round():
    """A refit on a few rows over-fits: early stopping ends it and keeps the weights with the lowest
    held-out error; patience 0 runs every round."""
    mlp = random_mlp(d=16, m=48, seed=3)
    pruned = mlp.select(torch.arange(24))
    g = torch.Generator().manual_seed(0)
    x, x_held = torch.randn(40, 16, generator=g), torch.randn(2000, 16, generator=g)
    holdout = Holdout(x_held, mlp(x_held))
    rounds = 30
    _, every = alternating_refit(pruned, x, mlp(x), rounds, 3, 1e-3, False)
    assert len(every) == rounds
    none, no_rounds = alternating_refit(pruned, x, mlp(x), 0, 3, 1e-3, False, holdout=holdout, patience=2)
    assert none is pruned and no_rounds == []
    best, history = alternating_refit(pruned, x, mlp(x), rounds, 3, 1e-3, False, holdout=holdout, patience=2)
    assert len(history) < rounds
    # the start is judged with W_down re-fit on the sample (no gradient steps), as every round is
    reference, _ = alternating_refit(pruned, x, mlp(x), 1, 0, 1e-3, False)
    assert best is not pruned and holdout.error(best) < holdout.error(reference)
    for r in range(1, len(history) + 1):  # no earlier stop point beats the returned weights
        earlier, _ = alternating_refit(pruned, x, mlp(x), r, 3, 1e-3, False)
        assert holdout.error(best) <= holdout.error(earlier) * (1 + 1e-6)


def test_refit_min_gain_stops_where_rounds_gain_little_and_keeps_the_best():
    """On plenty of rows the held-out error keeps falling; with a minimum relative gain the refit
    stops at the first round that gains less, still returning that round if it is the best.  The
    held-out errors of the start and every round run are recorded."""
    mlp = random_mlp(d=16, m=48, seed=5)
    pruned = mlp.select(torch.arange(24))
    g = torch.Generator().manual_seed(1)
    x, x_held = torch.randn(4000, 16, generator=g), torch.randn(2000, 16, generator=g)
    rounds = 12
    every_holdout = Holdout(x_held, mlp(x_held))
    _, every = alternating_refit(pruned, x, mlp(x), rounds, 3, 1e-3, False, holdout=every_holdout, patience=rounds)
    errors = every_holdout.errors  # start, then one per round
    assert len(errors) == rounds + 1 and errors[-1] < errors[0]
    gains = [1 - b / a for a, b in zip(errors[:-1], errors[1:])]
    threshold = sorted(gains)[len(gains) // 2]  # some rounds gain more, some less
    expected_stop = next(i for i, gain in enumerate(gains) if gain < threshold) + 1
    holdout = Holdout(x_held, mlp(x_held))
    best, history = alternating_refit(
        pruned, x, mlp(x), rounds, 3, 1e-3, False, holdout=holdout, patience=1, min_gain=threshold
    )
    assert len(history) == expected_stop
    assert holdout.errors == pytest.approx(errors[: expected_stop + 1], rel=1e-6)
    assert holdout.error(best) == pytest.approx(
        min(errors[: expected_stop + 1]) * float((holdout.y**2).sum()), rel=1e-6
    )


def test_small_calibration_still_holds_out_rows_for_early_stopping():
    positions, holdout = refit_token_positions(4096, 8192, 8192, seed=0)
    assert holdout is not None and int(holdout.sum()) == 1024 and positions.numel() == 4096
    positions, holdout = refit_token_positions(10_000, 8192, 8192, seed=0)
    assert int(holdout.sum()) == 2500 and int((~holdout).sum()) == 7500
