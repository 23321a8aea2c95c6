"""Streaming sufficient statistics of one MLP over calibration tokens.

For tokens x_n (n = 1..N), intermediate z_n in R^m and dense output y_n = W_down z_n + b in R^d:

    gram  G = sum_n w_n z_n z_n^T    (m, m)     (only its diagonal where ``full`` is False:
    cross C = sum_n w_n y_n z_n^T    (d, m)      score rules need no G and no C)
    z_sum   = sum_n w_n z_n          (m,)      y_sum = sum_n w_n y_n  (d,)
    y_sq    = sum_n w_n ||y_n||^2    scalar    mass = sum_n w_n,  count = N

are everything the least-squares subproblems need: for any W (d, m) and bias b,
sum_n w_n ||y_n - W z_n - b||^2 = y_sq - 2<W, C> - 2 b.y_sum + <W G, W> + 2 b.W z_sum + mass ||b||^2.
Token weights w_n default to 1 (then mass = N); see ``PruneConfig.token_weighting``.
z and y are computed in the activation dtype (the layer's compute dtype in the pipeline, as the model
computes them); chunks are multiplied in float32 (or the input dtype if wider) and added to float64
accumulators, so the result does not depend on how tokens are batched (up to float32 rounding inside
a chunk).  G and C may accumulate in float32 instead (half the m x m state; then chunks round too).
Products of bfloat16 activations run at the CPU's bfloat16 rate with the same result.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .bf16_products import bf16_rate_products
from .mlp import MLPWeights

CHUNK_TOKENS = 8192
"""Tokens multiplied at once when statistics accumulate (the default ``MLPStatistics.chunk_tokens``)."""


class NonFiniteStatisticsError(FloatingPointError):
    """Raised when calibration activations contain NaN or inf."""


class MLPStatistics:
    """Accumulates G, C, sums and a fixed random subset of input rows for one MLP."""

    def __init__(
        self,
        width: int,
        hidden_size: int,
        device: torch.device | str = "cpu",
        sample_positions: Tensor | None = None,
        chunk_tokens: int = CHUNK_TOKENS,
        activation_dtype: torch.dtype = torch.float32,
        full: bool = True,
        matrix_dtype: torch.dtype = torch.float64,
    ) -> None:
        f64: dict[str, Any] = dict(dtype=torch.float64, device=device)
        matrices: dict[str, Any] = dict(dtype=matrix_dtype, device=device)
        self.full = full  # False: only diag(G) (``z_sq``), z_sum and the y sums; no G, no C
        # G and C in ``matrix_dtype`` (float32 halves the m x m state; ``SolverConfig.solve_dtype``)
        self.gram = torch.zeros(width, width, **matrices) if full else torch.zeros(width, **f64)
        self.cross = torch.zeros(hidden_size, width if full else 0, **matrices)
        self.z_sum = torch.zeros(width, **f64)
        self.y_sum = torch.zeros(hidden_size, **f64)
        self.y_sq = torch.zeros((), **f64)
        self.mass = torch.zeros((), **f64)
        self.count = 0
        self.chunk_tokens = chunk_tokens
        self.activation_dtype = activation_dtype
        # Global token positions (sorted) whose inputs x are kept for refitting.
        self.sample_positions = sample_positions
        self._sample_rows: list[Tensor] = []
        self._sample_offsets: list[Tensor] = []
        self._sample_weights: list[Tensor] = []
        self.weighted = False  # set by the first update with token weights

    @property
    def width(self) -> int:
        return self.gram.shape[0]

    def update(
        self,
        x: Tensor,
        features: MLPWeights,
        target: MLPWeights | None = None,
        offset: Tensor | None = None,
        weight: Tensor | None = None,
        z: Tensor | None = None,
        y: Tensor | None = None,
    ) -> None:
        """Add tokens x (n, d): z from ``features``; y from ``target`` (default: the same MLP) plus
        ``offset`` (n, d) if given (an error-correction term added to the target); ``weight`` (n,)
        per-token weights w_n (default 1).  z and y are computed in ``activation_dtype`` (the
        weights must be in it), their products in float32.  ``z`` (n, m) and, without ``target``,
        ``y`` (n, d): these tokens' activations as the layer computed them, used instead of
        recomputing them."""
        x = x.reshape(-1, x.shape[-1])
        z_all = None if z is None else z.reshape(-1, z.shape[-1])
        y_all = None if y is None or target is not None else y.reshape(-1, y.shape[-1])
        offset = None if offset is None else offset.reshape(-1, offset.shape[-1])
        weight = None if weight is None else weight.reshape(-1)
        if weight is not None and weight.shape[0] != x.shape[0]:
            raise ValueError(f"got {weight.shape[0]} token weights for {x.shape[0]} tokens")
        self.weighted |= weight is not None
        self._keep_sample_rows(x, offset, weight)
        for start in range(0, x.shape[0], self.chunk_tokens):
            chunk = slice(start, start + self.chunk_tokens)
            xc = x[chunk].to(self.gram.device, self.activation_dtype)
            zc = features.intermediate(xc) if z_all is None else z_all[chunk]
            if target is not None:
                yc = target(xc)
            else:
                yc = features.output_from_intermediate(zc) if y_all is None else y_all[chunk]
            z, y = zc.to(self.gram.device, torch.float32), yc.to(self.gram.device, torch.float32)
            if offset is not None:
                y = y + offset[chunk].to(y)
            w = None if weight is None else weight[chunk].to(z)
            self.add(z, y, w, z_bf16=zc.dtype == torch.bfloat16, y_bf16=yc.dtype == torch.bfloat16 and offset is None)

    def add(
        self, z: Tensor, y: Tensor, weight: Tensor | None = None, z_bf16: bool = False, y_bf16: bool = False
    ) -> None:
        """Add precomputed intermediate activations z (n, m), targets y (n, d), token weights (n,).

        ``z_bf16`` / ``y_bf16``: z / y hold bfloat16 values (computed in bfloat16); unweighted
        products of such operands then run at the CPU's bfloat16 rate, exactly (``bf16_products``)."""
        if weight is None:
            wz, wy, mass = z, y, float(z.shape[0])
        else:
            if not (torch.isfinite(weight).all() and (weight >= 0).all()):
                raise NonFiniteStatisticsError("token weights must be finite and non-negative")
            wz, wy, mass = z * weight[:, None], y * weight[:, None], float(weight.double().sum())
        gram = (wz * z).sum(0)  # the Gram's diagonal: sum_n w_n z_ni^2
        y_sq = (wy.double() * y.double()).sum()
        # a NaN or inf in z or y makes sum w z_i^2 (diag of the Gram) or sum w ||y||^2 non-finite
        if not (torch.isfinite(gram).all() and torch.isfinite(y_sq)):
            raise NonFiniteStatisticsError(
                "calibration activations contain NaN or inf; check the model dtype (float16 overflow?) "
                "and the calibration data"
            )
        if self.full:
            fast = weight is None and z_bf16 and z.device.type == "cpu"
            with bf16_rate_products(fast):
                add_product(self.gram, wz, z)
            with bf16_rate_products(fast and y_bf16):
                add_product(self.cross, wy, z)
        else:
            self.gram += gram.double()
        self.z_sum += wz.sum(0).double()
        self.y_sum += wy.sum(0).double()
        self.y_sq += y_sq
        self.mass += mass
        self.count += z.shape[0]

    def _keep_sample_rows(self, x: Tensor, offset: Tensor | None, weight: Tensor | None) -> None:
        if self.sample_positions is None:
            return
        lo, hi = self.count, self.count + x.shape[0]
        pos = self.sample_positions
        sel = pos[(pos >= lo) & (pos < hi)] - lo
        if sel.numel():
            self._sample_rows.append(x[sel.to(x.device)].detach().to("cpu", torch.float32))
            if offset is not None:
                self._sample_offsets.append(offset[sel.to(offset.device)].detach().to("cpu", torch.float32))
            if weight is not None:
                self._sample_weights.append(weight[sel.to(weight.device)].detach().to("cpu", torch.float32))

    def sample_inputs(self) -> Tensor | None:
        """Kept input rows (n_sample, d) in float32 on CPU, or None if no sample was requested."""
        if self.sample_positions is None or not self._sample_rows:
            return None
        return torch.cat(self._sample_rows)

    def sample_offsets(self) -> Tensor | None:
        """Target offsets of the kept rows (n_sample, d), or None if no offsets were given."""
        return torch.cat(self._sample_offsets) if self._sample_offsets else None

    def sample_weights(self) -> Tensor | None:
        """Token weights of the kept rows (n_sample,), or None for unweighted statistics."""
        if not self.weighted:
            return None
        return torch.cat(self._sample_weights) if self._sample_weights else torch.zeros(0)

    @property
    def z_sq(self) -> Tensor:
        """sum_n w_n z_ni^2 per neuron (m,): diag(G)."""
        return self.gram.diagonal() if self.full else self.gram

    @property
    def z_mean(self) -> Tensor:
        return self.z_sum / max(float(self.mass), 1e-30)

    @property
    def z_var(self) -> Tensor:
        """Per-neuron (weighted) variance of z over tokens (population variance)."""
        n = max(float(self.mass), 1e-30)
        return (self.z_sq / n - self.z_mean.pow(2)).clamp_min(0)

    def state_tensors(self) -> list[Tensor]:
        """Tensors that are plain sums over tokens (for an all-reduce across data-parallel ranks)."""
        return [t for t in (self.gram, self.cross, self.z_sum, self.y_sum, self.y_sq, self.mass) if t.numel()]


def sample_token_positions(total_tokens: int, n_sample: int, seed: int) -> Tensor | None:
    """Sorted random positions in [0, total_tokens) to keep for refitting (all if n_sample >= total)."""
    positions, _ = refit_token_positions(total_tokens, n_sample, 0, seed)
    return positions


def refit_token_positions(
    total_tokens: int, n_fit: int, n_holdout: int, seed: int
) -> tuple[Tensor | None, Tensor | None]:
    """(sorted positions of the fit and held-out rows, bool mask (n,) of the held-out ones, or None).

    One random permutation: its first ``n_fit`` entries are the fit rows (the same for any
    ``n_holdout`` while both fit), the next ``n_holdout`` the held-out rows.  When the tokens do
    not hold both, the held-out rows get up to a quarter of them and the fit rows the rest, so a
    small calibration still has rows to stop the refit on."""
    if n_fit <= 0:
        return None, None
    if n_holdout > 0 and n_fit + n_holdout > total_tokens:
        n_holdout = min(n_holdout, total_tokens // 4)
        n_fit = min(n_fit, total_tokens - n_holdout)
    if n_fit >= total_tokens:
        return torch.arange(total_tokens), None
    perm = torch.randperm(total_tokens, generator=torch.Generator().manual_seed(seed))
    chosen = perm[: n_fit + max(n_holdout, 0)]
    order = chosen.sort()
    if chosen.numel() == n_fit:
        return order.values, None
    return order.values, order.indices >= n_fit


def add_product(acc: Tensor, a: Tensor, b: Tensor, rows: int = 1024) -> None:
    """acc += a^T b for a (n, p), b (n, q) and a float64 or float32 acc (p, q), ``rows`` rows of the
    product at a time: the float32 product and its cast never take more than rows x q each (not p x q)."""
    for start in range(0, a.shape[1], rows):
        acc[start : start + rows] += (a[:, start : start + rows].T @ b).to(acc.dtype)
