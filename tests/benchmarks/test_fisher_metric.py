"""benchmarks/studies/fisher_metric.py: the Fisher matrices and the metric change of coordinates."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fisher_metric import OutputMetric, layer_output_fisher

from spap.adapters import get_adapter
from spap.core import MLPStatistics, MLPWeights
from spap.core.linalg import QuadraticLS

from ..conftest import tiny_ids, tiny_model


def test_fisher_equals_per_token_gradients_of_the_summed_loss():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    ids = tiny_ids(n=4, seq_len=16)
    fisher = layer_output_fisher(model, adapter, ids, batch_size=2, dtype=torch.float32)
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards

    expected = [torch.zeros_like(m) for m in fisher]
    for row in ids:  # one sequence at a time, loss written out by hand
        outputs: list[torch.Tensor] = []
        handles = [
            layer.register_forward_hook(lambda _m, _a, o, out=outputs: out.append(o[0] if isinstance(o, tuple) else o))
            for layer in adapter.decoder_layers(model)
        ]
        try:
            logits = model(input_ids=row[None], use_cache=False).logits[0]
        finally:
            for h in handles:
                h.remove()
        loss = F.cross_entropy(logits[:-1], row[1:], reduction="sum")
        grads = torch.autograd.grad(loss, outputs)
        for acc, g in zip(expected, grads):
            g = g.flatten(0, -2).double()
            acc += g.T @ g
    for got, want in zip(fisher, expected):
        assert got.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)


def test_metric_coordinates_round_trip_and_keep_the_closed_form():
    """R is the root of M / mean diag + ridge I; the closed-form W_down in metric coordinates is R times
    the plain one (so only selection and refit can differ)."""
    gen = torch.Generator().manual_seed(0)
    d, m, n = 6, 10, 200
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    fisher = a @ a.T
    metric = OutputMetric.from_fisher(fisher, ridge=0.1)
    normalised = fisher / fisher.diagonal().mean() + 0.1 * torch.eye(d, dtype=torch.float64)
    torch.testing.assert_close((metric.root @ metric.root).double(), normalised, rtol=1e-4, atol=1e-5)

    mlp = MLPWeights(
        up=torch.randn(m, d, generator=gen),
        down=torch.randn(d, m, generator=gen),
        activation=F.silu,
        gate=torch.randn(m, d, generator=gen),
    )
    back = metric.from_metric(metric.to_metric(mlp))
    torch.testing.assert_close(back.down, mlp.down, rtol=1e-4, atol=1e-5)
    x = torch.randn(n, d, generator=gen)
    keep = torch.arange(0, m, 2)
    solutions = []
    for target in (mlp, metric.to_metric(mlp)):
        stats = MLPStatistics(m, d)
        stats.update(x, target)
        w, _ = QuadraticLS.from_stats(stats, keep).solve(0.0)
        solutions.append(w)
    torch.testing.assert_close(solutions[1].float(), metric.root @ solutions[0].float(), rtol=1e-3, atol=1e-4)
