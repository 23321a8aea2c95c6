"""Products of bfloat16-valued operands at the bfloat16 rate: exact where switched on, and switched
on only where the operands are bfloat16 values."""

import pytest
import torch

from spap.core import MLPStatistics, MLPWeights, bf16_products
from spap.core import stats as stats_module
from spap.core.bf16_products import bf16_rate_products


def bf16_values(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).bfloat16().float()


def test_bf16_rate_product_of_bf16_values_has_float32_accuracy_and_restores_the_setting():
    a, b = bf16_values(4096, 192), bf16_values(4096, 96, seed=1)
    exact = a.double().T @ b.double()
    before = torch.backends.mkldnn.matmul.fp32_precision
    with bf16_rate_products(True):
        fast = (a.T @ b).double()
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    plain = (a.T @ b).double()
    scale = exact.abs().max()
    # products of bf16 values are exact in float32; only the float32 sums round (about 1e-7 relative)
    assert (fast - exact).abs().max() / scale < 1e-5
    assert (plain - exact).abs().max() / scale < 1e-5


def test_inactive_block_changes_nothing():
    a = torch.randn(64, 32)  # not bfloat16 values
    before = torch.backends.mkldnn.matmul.fp32_precision
    with bf16_rate_products(False):
        assert torch.backends.mkldnn.matmul.fp32_precision == before
        product = a.T @ a
    torch.testing.assert_close(product, a.T @ a, rtol=0, atol=0)


@pytest.fixture
def recorded(monkeypatch):
    """Which products ran at the bf16 rate (as if the CPU had bf16 instructions)."""
    calls: list[bool] = []
    real = stats_module.bf16_rate_products

    def record(active: bool):
        calls.append(active)
        return real(active)

    monkeypatch.setattr(bf16_products, "cpu_multiplies_bf16", lambda: True)
    monkeypatch.setattr(stats_module, "bf16_rate_products", record)
    return calls


def mlp(dtype: torch.dtype, d: int = 16, m: int = 24) -> MLPWeights:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(dtype)  # noqa: E731
    return MLPWeights(up=r(m, d), down=r(d, m), activation=torch.nn.SiLU(), gate=r(m, d))


@pytest.mark.parametrize(
    "dtype, weighted, offset, expected",
    [
        (torch.bfloat16, False, False, [True, True]),  # Gram and cross at the bf16 rate
        (torch.bfloat16, False, True, [True, False]),  # y + offset is not bf16-valued: cross in float32
        (torch.bfloat16, True, False, [False, False]),  # weighted rows are not bf16-valued
        (torch.float32, False, False, [False, False]),
    ],
)
def test_statistics_use_the_bf16_rate_only_on_bf16_values(recorded, dtype, weighted, offset, expected):
    weights = mlp(dtype)
    x = torch.randn(300, 16)
    w = torch.rand(300) if weighted else torch.ones(300)
    stats = MLPStatistics(24, 16, activation_dtype=dtype)
    stats.update(x, weights, offset=torch.randn(300, 16) if offset else None, weight=w if weighted else None)
    assert recorded == expected
    z = weights.intermediate(x.to(dtype)).double()
    torch.testing.assert_close(stats.gram, (z * w.double()[:, None]).T @ z, rtol=1e-5, atol=1e-5)
