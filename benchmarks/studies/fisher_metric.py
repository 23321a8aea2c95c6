"""Output metric for the MLP reconstruction study: the empirical Fisher of each decoder layer's output.

The plain objective sum_n ||e_n||^2 treats every direction of the residual stream alike. With

    M_l = sum_n g_n g_n^T,   g_n = dLoss / dh_n   (h: decoder layer l's output, d),

e^T M e is the second-order (Fisher) estimate of the loss change an MLP error e causes.  Normalised
to mean diagonal 1 plus ``ridge`` * I and R = M_r^(1/2), ||R (Y - W_down Z)||^2 = ||R Y - (R W_down) Z||^2,
so any solver runs unchanged on the MLP with W_down -> R W_down (and b -> R b) and is mapped back with
R^-1.  The closed-form W_down is the same in both coordinates; the neuron selection and the W_up/W_gate
refit are not.  Used by layer_swap.py ("metric" / "metric_refit" variants); not part of spap.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from spap.core import MLPWeights


def layer_output_fisher(
    model: Any, adapter: Any, ids: Tensor, batch_size: int = 1, dtype: torch.dtype = torch.bfloat16
) -> list[Tensor]:
    """M_l (d, d) float64 for every decoder layer from one backward pass per batch of ``ids`` (n, S)
    (next-token cross-entropy summed over tokens; matmuls in ``dtype`` via CPU autocast; the whole
    model in memory)."""
    layers = adapter.decoder_layers(model)
    d = model.config.hidden_size
    fisher = [torch.zeros(d, d, dtype=torch.float64) for _ in layers]

    def on_output(index: int):
        def hook(_module: Any, _args: Any, output: Any) -> None:
            h = output[0] if isinstance(output, tuple) else output

            def accumulate(grad: Tensor) -> None:
                g = grad.detach().flatten(0, -2).double()
                fisher[index].add_(g.T @ g)

            h.register_hook(accumulate)

        return hook

    frozen = [(p, p.requires_grad) for p in model.parameters()]
    handles = [model.get_input_embeddings().register_forward_hook(lambda _m, _a, o: o.requires_grad_())]
    handles += [layer.register_forward_hook(on_output(i)) for i, layer in enumerate(layers)]
    try:
        for p, _ in frozen:
            p.requires_grad_(False)  # gradients w.r.t. activations only
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size]
            with torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext():
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            (loss * batch.shape[0] * (batch.shape[1] - 1)).backward()  # per-token gradients at unit scale
    finally:
        for h in handles:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
    return fisher


@dataclass
class OutputMetric:
    """R = (M / mean diag M + ridge I)^(1/2) (d, d) and R^-1, float32."""

    root: Tensor
    inverse_root: Tensor

    @classmethod
    def from_fisher(cls, fisher: Tensor, ridge: float) -> OutputMetric:
        if ridge <= 0:
            raise ValueError(f"ridge must be > 0, got {ridge}")
        m = fisher.double()
        m = m / m.diagonal().mean()
        m = (m + m.T) / 2 + ridge * torch.eye(m.shape[0], dtype=m.dtype)
        eigenvalues, vectors = torch.linalg.eigh(m)
        eigenvalues = eigenvalues.clamp_min(ridge)
        root = (vectors * eigenvalues.sqrt()) @ vectors.T
        return cls(root.float(), ((vectors * eigenvalues.rsqrt()) @ vectors.T).float())

    def to_metric(self, weights: MLPWeights) -> MLPWeights:
        return _map_output(weights, self.root)

    def from_metric(self, weights: MLPWeights) -> MLPWeights:
        return _map_output(weights, self.inverse_root)


def _map_output(weights: MLPWeights, matrix: Tensor) -> MLPWeights:
    bias = None if weights.down_bias is None else matrix @ weights.down_bias
    return replace(weights, down=matrix @ weights.down, down_bias=bias)
