"""Closed-form (ridge) least squares on MLP statistics.

Problem, for a kept neuron set S and optional bias b (intercept):

    f(W, b) = 1/2 sum_n ||y_n - W z_{n,S} - b||^2 + 1/2 sum_{i in S} (p_i + delta) ||W[:, i]||^2

with per-neuron penalties p (SPAP: p_i = rho * s_i) and damping delta.  Setting the gradient to zero
gives W (G_SS + diag(p) + delta I) = C_S without bias; with bias the system is the same with z
augmented by a constant 1 (no penalty on the intercept).  Solved with a Cholesky factorisation;
if it fails the damping is raised tenfold (with a warning) until it succeeds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from .stats import MLPStatistics

log = logging.getLogger(__name__)


@dataclass
class QuadraticLS:
    """Sufficient statistics of a least-squares fit restricted to some neurons: G and C in float64 or
    float32 (the solve runs in their dtype), the sums in float64."""

    gram: Tensor  # (m, m)
    cross: Tensor  # (d, m), the dtype of gram
    z_sum: Tensor  # (m,)
    y_sum: Tensor  # (d,)
    y_sq: Tensor  # ()
    count: float  # sum of token weights (the number of tokens when unweighted)

    @classmethod
    def from_stats(cls, stats: MLPStatistics, keep: Tensor | None = None) -> QuadraticLS:
        if not stats.full:
            raise ValueError("least squares needs the full Gram matrix; these statistics hold its diagonal only")
        problem = cls(stats.gram, stats.cross, stats.z_sum, stats.y_sum, stats.y_sq, float(stats.mass))
        return problem if keep is None else problem.restrict(keep)

    @classmethod
    def from_data(
        cls, z: Tensor, y: Tensor, weight: Tensor | None = None, product_dtype: torch.dtype = torch.float64
    ) -> QuadraticLS:
        """Statistics of rows z (n, m), y (n, d) with optional token weights (n,), stored in float64.

        ``product_dtype``: dtype of the products Z^T Z and Y^T Z (autocast off).  float32 is about
        3x faster on CPUs and, with damping, accurate enough where the statistics only steer an
        iteration (the refit's inner W_down) rather than give the final weights."""
        z, y = z.to(product_dtype), y.to(product_dtype)
        if weight is None:
            wz, wy, mass = z, y, float(z.shape[0])
        else:
            w = weight.to(z)[:, None]
            wz, wy, mass = z * w, y * w, float(weight.double().sum())
        with torch.autocast(z.device.type, enabled=False):
            gram, cross = wz.T @ z, wy.T @ z
        sums = (wz.sum(0, dtype=torch.float64), wy.sum(0, dtype=torch.float64), (wy.double() * y.double()).sum())
        return cls(gram.double(), cross.double(), *sums, mass)

    def restrict(self, keep: Tensor) -> QuadraticLS:
        keep = keep.to(self.gram.device)
        return QuadraticLS(
            self.gram[keep[:, None], keep], self.cross[:, keep], self.z_sum[keep], self.y_sum, self.y_sq, self.count
        )

    def centered(self) -> QuadraticLS:
        """The problem for z - mean(z), y - mean(y): a fit with a free intercept, intercept eliminated."""
        n = max(self.count, 1e-30)
        zm, ym = self.z_sum / n, self.y_sum / n
        dtype = self.gram.dtype
        gram = torch.outer(zm, zm).to(dtype).mul_(-n).add_(self.gram)  # G - n zm zm^T, one m x m allocation
        return QuadraticLS(
            gram,
            self.cross - (n * torch.outer(ym, zm)).to(dtype),
            torch.zeros_like(self.z_sum),
            torch.zeros_like(self.y_sum),
            self.y_sq - n * ym @ ym,
            self.count,
        )

    @property
    def mean_diag(self) -> float:
        return float(self.gram.diagonal().mean()) if self.gram.numel() else 1.0

    def augmented(self, fit_bias: bool) -> tuple[Tensor, Tensor]:
        """(G, C) with z extended by a constant-1 feature when ``fit_bias``."""
        if not fit_bias:
            return self.gram, self.cross
        m = self.gram.shape[0]
        g = self.gram.new_empty(m + 1, m + 1)
        g[:m, :m] = self.gram
        g[:m, m] = self.z_sum
        g[m, :m] = self.z_sum
        g[m, m] = self.count
        return g, torch.cat([self.cross, self.y_sum[:, None].to(self.cross.dtype)], dim=1)

    def solve(
        self, damping: float, penalty: Tensor | None = None, fit_bias: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Minimiser (W (d, m), b (d,) or None) of f for per-neuron penalties ``penalty`` (m,)."""
        g, c = self.augmented(fit_bias)
        m = self.gram.shape[0]
        diag = torch.full((g.shape[0],), float(damping), dtype=g.dtype, device=g.device)
        if fit_bias:
            diag[m] = 0.0
        if penalty is not None:
            diag[:m] += penalty.to(g)
        w = solve_spd(g, c, diag)
        if fit_bias:
            return w[:, :m], w[:, m]
        return w, None

    def objective(self, w: Tensor, b: Tensor | None = None) -> float:
        """1/2 sum_n ||y_n - W z_n - b||^2 (no penalty terms)."""
        w = w.to(self.gram.dtype)  # a float64 copy of a float32 G would be the m x m matrix spared
        val = self.y_sq - 2 * (w * self.cross).sum(dtype=torch.float64) + ((w @ self.gram) * w).sum(dtype=torch.float64)
        w = w.double()
        if b is not None:
            b = b.double()
            val = val - 2 * b @ self.y_sum + 2 * b @ (w @ self.z_sum) + self.count * b @ b
        return 0.5 * float(val)

    def relative_error(self, w: Tensor, b: Tensor | None = None) -> float:
        """sum ||y - W z - b||^2 / sum ||y||^2."""
        return max(2 * self.objective(w, b), 0.0) / max(float(self.y_sq), 1e-30)


def solve_spd(gram: Tensor, cross: Tensor, diag: Tensor, max_tries: int = 8) -> Tensor:
    """W = C (G + diag(diag))^-1 for symmetric PSD G via Cholesky, raising damping on failure."""
    if not (torch.isfinite(gram).all() and torch.isfinite(cross).all()):
        from .stats import NonFiniteStatisticsError

        raise NonFiniteStatisticsError("Gram or cross statistics contain NaN or inf")
    extra = 0.0
    scale = float(gram.diagonal().abs().mean()) or 1.0
    for attempt in range(max_tries):
        chol, info = torch.linalg.cholesky_ex(with_diagonal(gram, diag + extra))
        if int(info) == 0:
            # W A = C  <=>  A W^T = C^T (A symmetric)
            return torch.cholesky_solve(cross.T, chol).T
        extra = scale * 10.0 ** (attempt - 8) if extra == 0.0 else extra * 10.0
        log.warning("Gram matrix is ill-conditioned (Cholesky failed); adding damping %.3g and retrying", extra)
    raise torch.linalg.LinAlgError("Gram matrix could not be factorised even with added damping")


def with_diagonal(gram: Tensor, *terms: Tensor | float) -> Tensor:
    """G + diag(t_1) + diag(t_2) + ... as a new matrix (the terms added to the diagonal in order),
    without materialising diag(t): one m x m allocation."""
    out = gram.clone()
    for term in terms:
        out.diagonal().add_(term)
    return out
