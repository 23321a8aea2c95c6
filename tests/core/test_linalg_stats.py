import pytest
import torch

from spap.core import MLPStatistics, MLPWeights, QuadraticLS
from spap.core.stats import add_product, sample_token_positions


def random_mlp(d=12, m=20, gated=True, bias=False, seed=0) -> MLPWeights:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return MLPWeights(
        up=r(m, d) / d**0.5,
        down=r(d, m) / m**0.5,
        activation=torch.nn.SiLU() if gated else torch.nn.ReLU(),
        gate=r(m, d) / d**0.5 if gated else None,
        up_bias=r(m) if bias else None,
        down_bias=r(d) if bias else None,
    )


def test_streaming_statistics_equal_batch_computation():
    mlp = random_mlp(bias=True)
    x = torch.randn(500, 12)
    stats = MLPStatistics(mlp.width, mlp.hidden_size, chunk_tokens=64)
    for chunk in x.split(37):  # uneven batches, chunked inside
        stats.update(chunk, mlp)
    z = mlp.intermediate(x).double()
    y = mlp(x).double()
    torch.testing.assert_close(stats.gram, z.T @ z, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.cross, y.T @ z, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.z_sum, z.sum(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.y_sq, y.pow(2).sum(), rtol=1e-5, atol=1e-4)
    assert stats.count == 500


def test_blockwise_product_equals_the_whole_product():
    a, b = torch.randn(50, 23), torch.randn(50, 7)
    acc = torch.ones(23, 7, dtype=torch.float64)
    add_product(acc, a, b, rows=5)  # 5 blocks, the last one short
    torch.testing.assert_close(acc, 1 + a.double().T @ b.double(), rtol=1e-5, atol=1e-5)


def test_sample_rows_are_the_requested_positions():
    mlp = random_mlp()
    x = torch.randn(300, 12)
    pos = sample_token_positions(300, 50, seed=3)
    stats = MLPStatistics(mlp.width, mlp.hidden_size, sample_positions=pos)
    for chunk in x.split(64):
        stats.update(chunk, mlp)
    torch.testing.assert_close(stats.sample_inputs(), x[pos])


def test_float32_products_agree_with_float64_statistics():
    g = torch.Generator().manual_seed(3)
    z, y, w = torch.randn(3000, 40, generator=g), torch.randn(3000, 9, generator=g), torch.rand(3000, generator=g)
    exact = QuadraticLS.from_data(z, y, w)
    fast = QuadraticLS.from_data(z, y, w, product_dtype=torch.float32)
    assert fast.gram.dtype == fast.cross.dtype == torch.float64
    torch.testing.assert_close(fast.gram, exact.gram, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(fast.cross, exact.cross, rtol=1e-5, atol=1e-3)
    assert fast.count == exact.count and float(fast.y_sq) == pytest.approx(float(exact.y_sq), rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the refit runs under autocast: products stay float32
        under_autocast = QuadraticLS.from_data(z, y, w, product_dtype=torch.float32)
    torch.testing.assert_close(under_autocast.gram, fast.gram)


def test_closed_form_down_equals_lstsq():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(400, 15, generator=g, dtype=torch.float64)
    y = torch.randn(400, 7, generator=g, dtype=torch.float64)
    problem = QuadraticLS.from_data(z, y)
    w, b = problem.solve(damping=0.0)
    expected = torch.linalg.lstsq(z, y).solution.T
    torch.testing.assert_close(w, expected, rtol=1e-8, atol=1e-10)
    assert b is None
    # with an intercept: lstsq on [z, 1]
    w, b = problem.solve(damping=0.0, fit_bias=True)
    expected = torch.linalg.lstsq(torch.cat([z, torch.ones(400, 1, dtype=z.dtype)], 1), y).solution.T
    torch.testing.assert_close(w, expected[:, :15], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(b, expected[:, 15], rtol=1e-8, atol=1e-10)
    # objective from statistics equals the direct sum of squares
    direct = 0.5 * (y - z @ w.T - b).pow(2).sum()
    assert abs(problem.objective(w, b) - float(direct)) < 1e-8 * float(y.pow(2).sum())


def test_ridge_and_penalty_match_normal_equations():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(100, 6, generator=g, dtype=torch.float64)
    y = torch.randn(100, 3, generator=g, dtype=torch.float64)
    problem = QuadraticLS.from_data(z, y)
    penalty = torch.tensor([0.0, 5.0, 0.0, 50.0, 1.0, 0.0], dtype=torch.float64)
    w, _ = problem.solve(damping=0.1, penalty=penalty)
    a = z.T @ z + torch.diag(penalty + 0.1)
    torch.testing.assert_close(w, torch.linalg.solve(a, z.T @ y).T)


def test_centered_problem_equals_intercept_fit():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(200, 5, generator=g, dtype=torch.float64) + 3.0
    y = torch.randn(200, 4, generator=g, dtype=torch.float64) - 2.0
    problem = QuadraticLS.from_data(z, y)
    w_bias, _ = problem.solve(0.0, fit_bias=True)
    w_centered, _ = problem.centered().solve(0.0)
    torch.testing.assert_close(w_bias, w_centered)


def test_singular_gram_is_regularised():
    z = torch.randn(50, 4, dtype=torch.float64)
    z = torch.cat([z, z[:, :1]], dim=1)  # duplicate column -> singular Gram
    y = z @ torch.randn(5, 3, dtype=torch.float64)
    w, _ = QuadraticLS.from_data(z, y).solve(damping=0.0)
    assert torch.isfinite(w).all()
    assert float((y - z @ w.T).pow(2).sum()) < 1e-6 * float(y.pow(2).sum())


def test_integer_token_weights_equal_repeated_tokens():
    """w_n = 2 must give exactly the statistics of token n seen twice (also the bias terms)."""
    mlp = random_mlp(bias=True)
    x = torch.randn(120, 12)
    weight = torch.randint(0, 4, (120,)).float()
    weighted = MLPStatistics(mlp.width, mlp.hidden_size, chunk_tokens=50)
    for xs, ws in zip(x.split(37), weight.split(37)):
        weighted.update(xs, mlp, weight=ws)
    repeated = MLPStatistics(mlp.width, mlp.hidden_size)
    repeated.update(x.repeat_interleave(weight.long(), dim=0), mlp)
    for a, b in zip(weighted.state_tensors(), repeated.state_tensors()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert float(weighted.mass) == float(weight.sum()) and weighted.count == 120
    w_stats, b_stats = QuadraticLS.from_stats(weighted).solve(1e-3, fit_bias=True)
    w_data, b_data = QuadraticLS.from_data(mlp.intermediate(x), mlp(x), weight).solve(1e-3, fit_bias=True)
    torch.testing.assert_close(w_stats, w_data, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b_stats, b_data, rtol=1e-4, atol=1e-5)


def test_weighted_closed_form_equals_lstsq_on_scaled_rows():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(300, 9, generator=g, dtype=torch.float64)
    y = torch.randn(300, 5, generator=g, dtype=torch.float64)
    weight = torch.rand(300, generator=g, dtype=torch.float64) * 10
    w, _ = QuadraticLS.from_data(z, y, weight).solve(damping=0.0)
    root = weight.sqrt()[:, None]
    torch.testing.assert_close(w, torch.linalg.lstsq(z * root, y * root).solution.T, rtol=1e-8, atol=1e-10)


def test_sample_weights_follow_the_sample_rows_and_bad_weights_raise():
    mlp = random_mlp()
    x, weight = torch.randn(200, 12), torch.rand(200)
    pos = sample_token_positions(200, 30, seed=1)
    stats = MLPStatistics(mlp.width, mlp.hidden_size, sample_positions=pos)
    for xs, ws in zip(x.split(64), weight.split(64)):
        stats.update(xs, mlp, weight=ws)
    torch.testing.assert_close(stats.sample_weights(), weight[pos])
    assert MLPStatistics(mlp.width, mlp.hidden_size, sample_positions=pos).sample_weights() is None
    with pytest.raises(ValueError, match="token weights"):
        stats.update(x[:10], mlp, weight=weight[:9])
    with pytest.raises(FloatingPointError, match="weights"):
        stats.update(x[:2], mlp, weight=torch.tensor([1.0, float("nan")]))
