"""A framework-free view of one transformer MLP block.

Notation used across ``spap.core`` (row-major, tokens are rows):

* ``x``  (n, d)   MLP inputs (hidden size d), one row per calibration token.
* ``z``  (n, m)   intermediate activations, m = MLP width ("neurons"):
  GLU (LLaMA/Qwen/Mistral):  z = act(x W_gate^T + b_gate) * (x W_up^T + b_up)
  plain (OPT):               z = act(x W_up^T + b_up)
* ``y``  (n, d)   MLP output  y = z W_down^T + b_down.

Pruning neuron i removes row i of W_up / W_gate (and their biases) and column i of W_down.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

Activation = Callable[[Tensor], Tensor]


@dataclass
class MLPWeights:
    """Weights of one MLP; ``gate`` is None for non-gated (OPT-style) MLPs.

    Shapes: up, gate (m, d); down (d, m); up_bias, gate_bias (m,); down_bias (d,).
    """

    up: Tensor
    down: Tensor
    activation: Activation
    gate: Tensor | None = None
    up_bias: Tensor | None = None
    gate_bias: Tensor | None = None
    down_bias: Tensor | None = None

    def __post_init__(self) -> None:
        m, d = self.up.shape
        if self.down.shape != (d, m):
            raise ValueError(f"down has shape {tuple(self.down.shape)}, expected {(d, m)} for up {(m, d)}")
        if self.gate is not None and self.gate.shape != (m, d):
            raise ValueError(f"gate has shape {tuple(self.gate.shape)}, expected {(m, d)}")

    @property
    def width(self) -> int:
        """Number of neurons m."""
        return self.up.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.up.shape[1]

    def intermediate(self, x: Tensor) -> Tensor:
        """z (n, m) for inputs x (n, d)."""
        h = F.linear(x, self.up, self.up_bias)
        if self.gate is None:
            return self.activation(h)
        return self.activation(F.linear(x, self.gate, self.gate_bias)) * h

    def output_from_intermediate(self, z: Tensor) -> Tensor:
        return F.linear(z, self.down, self.down_bias)

    def __call__(self, x: Tensor) -> Tensor:
        return self.output_from_intermediate(self.intermediate(x))

    def with_fields(self, fields: Mapping[str, Tensor | None]) -> MLPWeights:
        """A copy with the named fields (up, gate, down, up_bias, gate_bias, down_bias) replaced."""
        return replace(self, **fields)  # type: ignore[arg-type]

    def select(self, keep: Tensor) -> MLPWeights:
        """The MLP restricted to neurons ``keep`` (LongTensor of indices, in order)."""

        def rows(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[keep].clone()

        return replace(
            self,
            up=self.up[keep].clone(),
            gate=rows(self.gate),
            up_bias=rows(self.up_bias),
            gate_bias=rows(self.gate_bias),
            down=self.down[:, keep].clone(),
            down_bias=None if self.down_bias is None else self.down_bias.clone(),
        )

    def padded(self, width: int) -> MLPWeights:
        """The same function with ``width - m`` extra inert neurons (zero rows in, zero columns out).

        Requires act(0) == 0 (SiLU, GELU, ReLU) for non-gated MLPs with zero bias on the padding.
        """
        extra = width - self.width
        if extra < 0:
            raise ValueError(f"cannot pad width {self.width} down to {width}")

        def rows(t: Tensor | None) -> Tensor | None:
            return None if t is None else torch.cat([t, t.new_zeros(extra, *t.shape[1:])])

        down = torch.cat([self.down, self.down.new_zeros(self.down.shape[0], extra)], dim=1)
        return replace(
            self,
            up=torch.cat([self.up, self.up.new_zeros(extra, *self.up.shape[1:])]),
            gate=rows(self.gate),
            up_bias=rows(self.up_bias),
            gate_bias=rows(self.gate_bias),
            down=down,
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MLPWeights:
        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return replace(
            self,
            up=self.up.to(device=device, dtype=dtype),
            down=self.down.to(device=device, dtype=dtype),
            gate=cast(self.gate),
            up_bias=cast(self.up_bias),
            gate_bias=cast(self.gate_bias),
            down_bias=cast(self.down_bias),
        )
