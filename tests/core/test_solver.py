from dataclasses import replace

import pytest
import torch

from spap.core import MLPStatistics, MLPWeights, SolverConfig, prune_mlp
from spap.core.linalg import QuadraticLS
from spap.core.refit import alternating_refit, gradient_refit
from spap.core.scores import neuron_scores
from spap.core.selection import penalty_select
from spap.core.solver import finalize_down

from .test_linalg_stats import random_mlp


def stats_for(mlp: MLPWeights, x: torch.Tensor, sample: int = 0) -> MLPStatistics:
    pos = torch.arange(sample) if sample else None
    stats = MLPStatistics(mlp.width, mlp.hidden_size, sample_positions=pos)
    stats.update(x, mlp)
    return stats


def output_error(dense: MLPWeights, pruned: MLPWeights, x: torch.Tensor) -> float:
    y = dense(x)
    return float((y - pruned(x)).pow(2).sum() / y.pow(2).sum())


@pytest.mark.parametrize("method", ["spap", "magnitude", "wanda-sp", "fasp", "flap", "cfsp"])
@pytest.mark.parametrize("k", [1, 7, 19])
def test_exactly_k_neurons_removed(method, k):
    mlp = random_mlp(m=20)
    x = torch.randn(300, 12)
    res = prune_mlp(mlp, stats_for(mlp, x, 64), k, SolverConfig(method=method, refit_rounds=2), x[:64])
    assert res.weights.width == 20 - k
    assert res.kept.numel() == 20 - k and res.kept.unique().numel() == 20 - k
    assert res.weights.up.shape == (20 - k, 12) and res.weights.down.shape == (12, 20 - k)


def test_zero_sparsity_changes_nothing():
    mlp = random_mlp()
    x = torch.randn(100, 12)
    res = prune_mlp(mlp, stats_for(mlp, x), 0, SolverConfig())
    for name in ("up", "gate", "down"):
        assert torch.equal(getattr(res.weights, name), getattr(mlp, name))


def redundant_mlp(n_unique=10, n_copies=5, d=12, seed=0) -> tuple[MLPWeights, list[int]]:
    """A GLU MLP whose neurons n_unique.. are exact copies of earlier ones (same up and gate rows)."""
    base = random_mlp(d=d, m=n_unique, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    src = torch.randperm(n_unique, generator=g)[:n_copies]
    up = torch.cat([base.up, base.up[src]])
    gate = torch.cat([base.gate, base.gate[src]])
    down = torch.randn(d, n_unique + n_copies, generator=g)
    return MLPWeights(up=up, down=down, activation=base.activation, gate=gate), src.tolist()


def test_exactly_redundant_neurons_are_removed_with_zero_error():
    mlp, _ = redundant_mlp()
    x = torch.randn(400, 12)
    cfg = SolverConfig(refit="ls", damping=1e-8)
    res = prune_mlp(mlp, stats_for(mlp, x), 5, cfg)
    assert output_error(mlp, res.weights, x) < 1e-6
    # one neuron of each duplicated pair was removed, so the kept rows are all distinct
    assert torch.unique(res.weights.up, dim=0).shape[0] == 10
    # removing any other 5 neurons loses information
    wrong = torch.arange(5, 15)
    w, _ = QuadraticLS.from_stats(stats_for(mlp, x), wrong).solve(1e-8)
    assert QuadraticLS.from_stats(stats_for(mlp, x), wrong).relative_error(w) > 1e-3


def test_one_shot_scores_fail_on_duplicates_where_the_penalty_loop_succeeds():
    # Each member of a duplicated pair looks free to remove on its own (its twin compensates), so a
    # one-shot ranking removes both members of some pairs; the ramped penalty loop removes one at a time.
    mlp, _ = redundant_mlp()
    x = torch.randn(400, 12)
    stats = stats_for(mlp, x)
    one_shot = prune_mlp(mlp, stats, 5, SolverConfig(selection="score", refit="ls", damping=1e-8))
    loop = prune_mlp(mlp, stats, 5, SolverConfig(refit="ls", damping=1e-8))
    assert loop.error_ls < 1e-6 < one_shot.error_ls


def test_penalty_loop_is_no_worse_than_one_shot_scores_on_correlated_neurons():
    g = torch.Generator().manual_seed(5)
    mlp = random_mlp(d=16, m=48, seed=5)
    # correlated inputs make neurons partially redundant
    x = torch.randn(2000, 4, generator=g) @ torch.randn(4, 16, generator=g) + 0.3 * torch.randn(2000, 16, generator=g)
    stats = stats_for(mlp, x)
    errors = {}
    for selection in ("penalty", "score"):
        res = prune_mlp(mlp, stats, 24, SolverConfig(selection=selection, refit="ls"))
        errors[selection] = res.error_ls
    assert errors["penalty"] <= errors["score"] * 1.0001


def test_penalty_trace_records_rounds_and_ramp():
    mlp = random_mlp(m=30)
    x = torch.randn(200, 12)
    cfg = SolverConfig(penalty_rounds=10, ramp=0.5, penalty_patience=0)  # every round
    mask, trace = penalty_select(QuadraticLS.from_stats(stats_for(mlp, x)), 8, cfg)
    assert int(mask.sum()) == 8
    assert len(trace.objective) == 10
    assert trace.target_size[-1] == 8 and trace.target_size[0] < 8
    assert trace.target_size == sorted(trace.target_size)


def test_alternating_refit_objective_is_non_increasing_and_improves():
    mlp = random_mlp(d=16, m=40, seed=7)
    x = torch.randn(600, 16)
    y = mlp(x)
    stats = stats_for(mlp, x)
    start = prune_mlp(mlp, stats, 16, SolverConfig(refit="ls"))
    new, history = alternating_refit(start.weights, x, y, rounds=8, grad_steps=3, damping_rel=1e-3, fit_bias=False)
    assert len(history) == 8
    assert all(b <= a * (1 + 1e-6) for a, b in zip(history, history[1:]))
    assert output_error(mlp, new, x) < output_error(mlp, start.weights, x)


def test_armijo_returns_the_loss_of_its_weights_and_never_raises_it():
    """The loss reported (reused from the accepted trial's forward pass) is the loss of the returned
    weights, and a step from the closed form does not increase it."""
    from spap.core.refit import _objective, armijo_descent

    mlp = random_mlp(d=16, m=40, seed=9)
    x = torch.randn(500, 16)
    start = prune_mlp(mlp, stats_for(mlp, x), 16, SolverConfig(refit="ls")).weights
    loss = lambda w, z: _objective(w, z, mlp(x), 1e-3, None)  # noqa: E731
    at = lambda w: float(loss(w, w.intermediate(x)))  # noqa: E731
    new, lr, value, point = armijo_descent(start, ("up", "gate"), x, loss, steps=4, lr=None)
    assert value == pytest.approx(at(new), rel=1e-6)
    assert value < at(start)
    assert lr is not None and lr > 0
    assert not new.up.requires_grad and new.down is start.down  # only the named fields moved


def test_armijo_resumed_from_its_last_point_equals_a_fresh_start_with_one_forward_less(monkeypatch):
    """The point a call returns (z at its weights, graph unused) may start the next call after W_down
    changed: same weights and loss as recomputing it, bit for bit, and one forward pass fewer."""
    from spap.core.refit import _objective, armijo_descent

    mlp = random_mlp(d=16, m=40, seed=10)
    x = torch.randn(400, 16)
    start = prune_mlp(mlp, stats_for(mlp, x), 16, SolverConfig(refit="ls")).weights
    loss = lambda w, z: _objective(w, z, mlp(x), 1e-3, None)  # noqa: E731
    first, lr, _, point = armijo_descent(start, ("up", "gate"), x, loss, steps=2, lr=None)
    assert point is not None and torch.equal(point.z, first.intermediate(x))
    moved = replace(first, down=1.1 * first.down)  # what the closed-form step does in between

    calls = {"n": 0}
    intermediate = MLPWeights.intermediate

    def counted(self, inputs):
        calls["n"] += 1
        return intermediate(self, inputs)

    monkeypatch.setattr(MLPWeights, "intermediate", counted)
    resumed = armijo_descent(moved, ("up", "gate"), x, loss, steps=2, lr=lr, start=point)
    resumed_calls, calls["n"] = calls["n"], 0
    fresh = armijo_descent(moved, ("up", "gate"), x, loss, steps=2, lr=lr)
    assert torch.equal(resumed[0].up, fresh[0].up) and torch.equal(resumed[0].gate, fresh[0].gate)
    assert resumed[2] == fresh[2] and resumed[1] == fresh[1]
    assert resumed_calls == calls["n"] - 1


def test_a_bfloat16_refit_holds_at_most_three_trial_points_at_once(monkeypatch):
    """Memory: the refit under autocast keeps no cast cache, so a rejected or superseded trial point
    (a copy of W_up/W_gate with its graph) is freed at once, however many trials the run makes."""
    import weakref

    from spap.core import refit

    alive: list[weakref.ref] = []
    peak = {"n": 0}
    init = refit.Evaluated.__init__

    def tracked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        alive.append(weakref.ref(self.params["up"]))
        peak["n"] = max(peak["n"], sum(r() is not None for r in alive))

    monkeypatch.setattr(refit.Evaluated, "__init__", tracked)
    mlp = random_mlp(d=16, m=40, seed=11)
    x = torch.randn(400, 16)
    cfg = SolverConfig(method="spap", refit="alternating", refit_rounds=4, refit_grad_steps=4, refit_patience=0)
    prune_mlp(mlp, stats_for(mlp, x, 400), 16, cfg, x, refit_dtype=torch.bfloat16)
    assert len(alive) > 8  # the run made many trials
    assert peak["n"] <= 3


def test_gradient_refit_decreases_objective():
    mlp = random_mlp(d=16, m=40, seed=8)
    x = torch.randn(600, 16)
    start = prune_mlp(mlp, stats_for(mlp, x), 16, SolverConfig(refit="ls"))
    new, history = gradient_refit(start.weights, x, mlp(x), rounds=5, grad_steps=2, damping_rel=1e-3)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(history, history[1:]))
    assert output_error(mlp, new, x) < output_error(mlp, start.weights, x)


def test_bias_mlp_refits_bias_and_beats_no_bias():
    mlp = random_mlp(gated=False, bias=True, seed=9)
    x = torch.randn(500, 12) + 1.0
    stats = stats_for(mlp, x)
    with_bias = prune_mlp(mlp, stats, 8, SolverConfig(refit="ls", fit_bias="yes"))
    without = prune_mlp(mlp, stats, 8, SolverConfig(refit="ls", fit_bias="no"))
    assert with_bias.error_ls <= without.error_ls + 1e-12
    assert not torch.equal(with_bias.weights.down_bias, mlp.down_bias)


def test_flap_bias_compensation_matches_mean_contribution():
    mlp = random_mlp(seed=10)
    x = torch.randn(300, 12)
    stats = stats_for(mlp, x)
    res = prune_mlp(mlp, stats, 6, SolverConfig(method="flap"))
    removed = torch.ones(mlp.width, dtype=torch.bool)
    removed[res.kept] = False
    expected = mlp.down[:, removed] @ mlp.intermediate(x)[:, removed].mean(0)
    torch.testing.assert_close(res.weights.down_bias, expected, rtol=1e-4, atol=1e-5)
    # mean output is preserved exactly
    torch.testing.assert_close(res.weights(x).mean(0), mlp(x).mean(0), rtol=1e-4, atol=1e-4)


def test_cfsp_score_ranks_like_the_reference_elementwise_formula():
    # CFSP's reference (local metric three_w_one_wa, b = c = 1): per element of W_down (d, m)
    # (|W_down| a / colsum + |W_up^T| / colsum + |W_gate^T| / colsum) * a, then the mean over the d rows.
    mlp = random_mlp(m=24, seed=3)
    x = torch.randn(400, 12) * torch.linspace(0.2, 3.0, 12)
    stats = stats_for(mlp, x)
    z = mlp.intermediate(x).double()
    a = z.pow(2).sum(0).sqrt()  # the reference's 1/sqrt(n_seq) factor is a constant per layer

    def relative(w):  # (d, m): each column normalised by its absolute sum
        return w.abs() / w.abs().sum(0)

    down, up_t, gate_t = mlp.down.double(), mlp.up.double().T, mlp.gate.double().T
    reference = ((relative(down * a) + relative(up_t) + relative(gate_t)) * a).mean(0)
    ours = neuron_scores("cfsp", mlp.down, stats)
    torch.testing.assert_close(reference, ours * 3 / mlp.hidden_size, rtol=1e-5, atol=0)
    assert torch.equal(torch.argsort(reference), torch.argsort(ours))


def test_invalid_counts_and_config_raise():
    mlp = random_mlp(m=10)
    stats = stats_for(mlp, torch.randn(50, 12))
    with pytest.raises(ValueError, match="cannot prune"):
        prune_mlp(mlp, stats, 10, SolverConfig())
    with pytest.raises(ValueError, match="unknown method"):
        SolverConfig(method="nope")
    with pytest.raises(ValueError, match="needs stored calibration inputs"):
        prune_mlp(mlp, stats, 3, SolverConfig(refit="alternating"))


def test_nan_activations_raise_clear_error():
    from spap.core import NonFiniteStatisticsError

    mlp = random_mlp()
    x = torch.randn(20, 12)
    x[3, 2] = float("nan")
    with pytest.raises(NonFiniteStatisticsError, match="NaN"):
        MLPStatistics(mlp.width, mlp.hidden_size).update(x, mlp)


def test_weighted_refit_is_non_increasing_and_unit_weights_change_nothing():
    mlp = random_mlp(d=16, m=40, seed=9)
    x = torch.randn(500, 16)
    x[:5] *= 30  # a few tokens with massive activations, as at attention sinks
    y = mlp(x)
    start = prune_mlp(mlp, stats_for(mlp, x), 16, SolverConfig(refit="ls")).weights
    weight = 1 / y.pow(2).mean(-1)
    new, history = alternating_refit(start, x, y, 6, 3, 1e-3, False, token_weight=weight)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(history, history[1:]))

    def weighted_error(w):
        return float(((y - w(x)).pow(2).sum(-1) * weight).sum())

    assert weighted_error(new) < weighted_error(start)
    plain, h_plain = alternating_refit(start, x, y, 3, 2, 1e-3, False)
    ones, h_ones = alternating_refit(start, x, y, 3, 2, 1e-3, False, token_weight=torch.ones(500))
    torch.testing.assert_close(ones.up, plain.up)
    assert h_ones == pytest.approx(h_plain)


def _refit_then_finalize(mlp: MLPWeights, x: torch.Tensor, sample: int, cfg: SolverConfig):
    stats = stats_for(mlp, x, sample)
    res = prune_mlp(mlp, stats, 16, cfg, stats.sample_inputs())
    final = MLPStatistics(res.weights.width, mlp.hidden_size)
    final.update(x, res.weights, mlp)
    return res, finalize_down(res, final, cfg, fit_bias=False)


def test_safeguard_restores_closed_form_where_the_sample_refit_raises_the_full_objective():
    """A refit on 40 ordinary tokens overfits them and misses the 5 massive ones that dominate the
    all-token objective: without the safeguard the final error exceeds the closed form's; with it
    the closed-form weights come back exactly."""
    mlp = random_mlp(d=16, m=40, seed=3)
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(3))  # not the order-dependent global RNG
    x[-5:] *= 40  # outside the sample (first 40 rows)
    cfg = dict(refit_rounds=30, refit_grad_steps=5)
    _, off = _refit_then_finalize(mlp, x, 40, SolverConfig(method="spap", refit_safeguard=False, **cfg))
    assert off.refit_accepted and off.error_refit > off.error_ls
    assert output_error(mlp, off.weights, x) > output_error(mlp, off.closed_form, x)
    res, on = _refit_then_finalize(mlp, x, 40, SolverConfig(method="spap", **cfg))
    assert on.refit_accepted is False and on.error_refit == pytest.approx(off.error_refit)
    for name in ("up", "gate", "down"):
        assert torch.equal(getattr(on.weights, name), getattr(res.closed_form, name))


def test_safeguard_keeps_a_refit_that_lowers_the_full_objective():
    mlp = random_mlp(d=16, m=40, seed=7)
    x = torch.randn(600, 16)
    res, on = _refit_then_finalize(mlp, x, 600, SolverConfig(method="spap", refit_rounds=8))
    assert on.refit_accepted is True and on.error_refit < on.error_ls
    assert not torch.equal(on.weights.up, res.closed_form.up)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("method", ["spap-ls", "spap"])
def test_float32_solve_matches_float64(method, bias):
    """G and C accumulated and solved in float32 (half the m x m state): nearly the same neurons and
    the same reconstruction error as float64, and the state really is float32."""
    mlp = random_mlp(d=48, m=192, seed=3)
    if bias:
        mlp = replace(mlp, down_bias=torch.randn(48))
    x = torch.randn(4000, 48)
    results = {}
    for dtype in (torch.float64, torch.float32):
        stats = MLPStatistics(mlp.width, mlp.hidden_size, sample_positions=torch.arange(256), matrix_dtype=dtype)
        stats.update(x, mlp)
        assert stats.gram.dtype == stats.cross.dtype == dtype
        cfg = SolverConfig(method=method, refit_rounds=2, solve_dtype=str(dtype).removeprefix("torch."))
        results[dtype] = prune_mlp(mlp, stats, 64, cfg, stats.sample_inputs())
    kept64, kept32 = (set(results[d].kept.tolist()) for d in (torch.float64, torch.float32))
    assert len(kept64 & kept32) >= 0.97 * len(kept64), len(kept64 & kept32)
    e64, e32 = (
        output_error(mlp, results[torch.float64].weights, x),
        output_error(mlp, results[torch.float32].weights, x),
    )
    assert e32 == pytest.approx(e64, rel=0.02), (e32, e64)
    assert results[torch.float32].weights.down.dtype == torch.float32
