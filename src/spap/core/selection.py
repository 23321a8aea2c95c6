"""SPAP's penalty-method neuron selection for one MLP.

Mixed-integer problem (s_i = 1 marks a pruned neuron, k = number pruned):

    min_{W, s}  1/2 ||Y - W Z||^2   s.t.  W diag(s) = 0,  s in {0,1}^m,  sum(s) = k.

Penalty relaxation with s in [0, 1] and damping delta:

    F_rho(W, s) = 1/2 ||Y - W Z||^2 + rho/2 sum_i s_i ||W[:, i]||^2 + delta/2 ||W||^2.

Each of K rounds:
  (a) W = C A^-1,  A = G + rho diag(s) + delta I       exact minimiser of F_rho over W (Cholesky);
  (b) importance_i = ||W[:, i]||^2 G_ii^(1-t) / ([A^-1]_ii)^t     (score exponent t, see below);
  (c) s <- (1 - alpha) s + alpha 1[i among the k_r lowest importances]   (soft, momentum alpha);
  (d) rho <- tau rho.
With t = 1, (b) is the exact increase of the (penalised) least-squares error when neuron i is
removed and the others re-fit (the Optimal-Brain-Surgeon formula, which trusts the calibration
covariance fully); t = 0 gives ||W[:, i]||^2 G_ii, the error increase without compensation (the
activation-weighted column energy, a Wanda-like score).  t = 0.5 transferred best to text outside
the calibration domain in our measurements (docs/hyperparameters.md).  k_r grows linearly from k/R to k
over the first R = ramp * K rounds: neurons chosen early are penalised (softly removed) before
later ones are chosen, so later choices account for them.  Without the ramp the first round's
choice is self-reinforcing (penalised columns shrink, so their importance only falls) and the loop
returns the one-shot choice; the ramp is our addition (measured in docs/hyperparameters.md).
The k neurons with the largest s (ties: lowest importance) are pruned.
Once k_r = k and the bottom-k set has not changed for ``penalty_patience`` rounds, the loop stops
and applies the remaining rounds' momentum updates towards that set in closed form, which is exact
if the set would not have changed again (measured on SmolLM2: it never did after the ramp).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .linalg import QuadraticLS, with_diagonal
from .scores import bottom_k, first_k_per_block
from .solver_config import SolverConfig


@dataclass
class PenaltyTrace:
    """Per-round record of the penalty loop (errors relative to ||Y||^2)."""

    objective: list[float] = field(default_factory=list)  # ||Y - W Z||^2 / ||Y||^2
    penalty: list[float] = field(default_factory=list)  # rho sum s_i ||W_i||^2 / ||Y||^2
    target_size: list[int] = field(default_factory=list)  # k_r


def compensated_importance(
    problem: QuadraticLS, penalty: Tensor | None, damping: float, exponent: float, groups: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(importance per neuron or group, W (d, m)) with A = G + diag(penalty) + damping I.

    Neurons: ||W_i||^2 G_ii^(1-t) / ([A^-1]_ii)^t.  Groups (column blocks g, e.g. attention heads):
    U_g^(1-t) C_g^t with the uncompensated cost U_g = tr(W_g G_gg W_g^T) and the compensated
    (group-OBS) cost C_g = tr(W_g [(A^-1)_gg]^-1 W_g^T); both reduce to the neuron formula for |g| = 1.
    """
    m = problem.gram.shape[0]
    diag = torch.full((m,), float(damping), dtype=problem.gram.dtype, device=problem.gram.device)
    if penalty is not None:
        diag = diag + penalty
    chol, info = torch.linalg.cholesky_ex(with_diagonal(problem.gram, diag))
    if int(info) != 0:  # fall back to extra damping
        chol = torch.linalg.cholesky(with_diagonal(problem.gram, diag, problem.mean_diag * 1e-2))
    w = torch.cholesky_solve(problem.cross.T, chol).T
    inv = torch.cholesky_inverse(chol)
    if groups is None:
        return _neuron_importance(w, inv.diagonal(), problem.gram.diagonal(), exponent), w
    out = []
    for g in range(int(groups.max()) + 1):
        idx = torch.nonzero(groups == g).flatten().to(w.device)
        wg = w[:, idx]
        tiny = torch.finfo(wg.dtype).tiny
        u = ((wg.T @ wg) * problem.gram[idx][:, idx]).sum().clamp_min(tiny)
        c = (wg * torch.linalg.solve(inv[idx][:, idx], wg.T).T).sum().clamp_min(tiny)
        out.append(u.pow(1 - exponent) * c.pow(exponent))
    return torch.stack(out), w


class _PenalisedSolver:
    """W = C A^-1 and diag(A^-1) for A = B + diag(pi), B = G + delta I, from one factorisation of B.

    Woodbury on the support S of the penalties pi (p = |S| neurons):

        A^-1 = B^-1 - U K^-1 U^T,   U = B^-1[:, S] (m, p),   K = diag(1 / pi_S) + B^-1[S, S] (p, p),

    so with K = L L^T and Q = L^-1 U^T (p, m):  diag(A^-1) = diag(B^-1) - sum_rows Q^2  and
    W = W_0 - (L^-1 W_0[:, S]^T)^T Q  with W_0 = C B^-1.  A round costs O(p^2 m + d p m) instead of
    a factorisation and inverse of the m x m matrix A (in G's dtype throughout; equal to the direct
    solve up to rounding)."""

    def __init__(self, problem: QuadraticLS, damping: float) -> None:
        # besides G at most two m x m matrices at a time: B and its factor L, then L and B^-1
        chol, info = torch.linalg.cholesky_ex(with_diagonal(problem.gram, damping))
        if int(info) != 0:  # same fallback as the direct path: extra damping
            chol = torch.linalg.cholesky(with_diagonal(problem.gram, damping, problem.mean_diag * 1e-2))
        self.b_inv = torch.cholesky_inverse(chol)
        del chol
        self.b_inv_diag = self.b_inv.diagonal().clone()
        self.w0 = problem.cross @ self.b_inv

    def __call__(self, penalty: Tensor | None) -> tuple[Tensor, Tensor]:
        """(W (d, m), diag(A^-1) (m,)) for per-neuron penalties ``penalty`` (m,) >= 0."""
        support = None if penalty is None else torch.nonzero(penalty > 0).flatten()
        if penalty is None or support is None or support.numel() == 0:
            return self.w0, self.b_inv_diag
        # at the round's peak G, B^-1, U^T, L and Q: (2 + 2 s + s^2) m^2 for p = s m (no p x m temporaries)
        u_t = self.b_inv[support]  # (p, m) = U^T (B^-1 is symmetric)
        k = u_t[:, support]
        k.diagonal().add_(1.0 / penalty[support])
        chol = torch.linalg.cholesky(k)
        del k
        q = torch.linalg.solve_triangular(chol, u_t, upper=False)
        del u_t
        r = torch.linalg.solve_triangular(chol, self.w0[:, support].T, upper=False)
        return self.w0 - r.T @ q, self.b_inv_diag - torch.linalg.vector_norm(q, dim=0).square()


def _neuron_importance(w: Tensor, inv_diag: Tensor, gram_diag: Tensor, exponent: float) -> Tensor:
    """||W_i||^2 G_ii^(1-t) / ([A^-1]_ii)^t."""
    tiny = torch.finfo(w.dtype).tiny
    return w.pow(2).sum(0) * gram_diag.clamp_min(tiny).pow(1 - exponent) / inv_diag.clamp_min(tiny).pow(exponent)


def penalty_select(
    problem: QuadraticLS, n_prune: int, cfg: SolverConfig, groups: Tensor | None = None, blocks: Tensor | None = None
) -> tuple[Tensor, PenaltyTrace]:
    """Bool mask of the n_prune neurons (or groups, if ``groups`` maps columns to group ids) SPAP removes.

    With ``blocks`` (unit -> block id, e.g. query head -> KV group) n_prune units are removed from
    every block (the top-k steps become top-k per block).  Callers pass the centred problem when
    the layer has a bias, so the intercept is never penalised.  Neurons (no ``groups``) use one
    factorisation per call (``_PenalisedSolver``); groups factorise A every round.
    """
    m = problem.gram.shape[0]
    n_units = m if groups is None else int(groups.max()) + 1
    trace = PenaltyTrace()
    if n_prune <= 0:
        return torch.zeros(n_units, dtype=torch.bool), trace
    scale = problem.mean_diag
    damping = cfg.damping * scale
    y_sq = max(float(problem.y_sq), 1e-30)
    s = torch.zeros(n_units, dtype=torch.float64, device=problem.gram.device)
    column_group = None if groups is None else groups.to(problem.gram.device)
    rho = cfg.rho_init * scale
    ramp_rounds = max(1, round(cfg.ramp * cfg.penalty_rounds))
    solver = _PenalisedSolver(problem, damping) if groups is None else None
    gram_diag = problem.gram.diagonal()

    def importance_at(penalty: Tensor | None) -> tuple[Tensor, Tensor, float]:
        """(importance, W, ||Y - W Z||^2) at the penalties."""
        if solver is None:
            importance, w = compensated_importance(problem, penalty, damping, cfg.score_exponent, groups)
            return importance, w, 2 * problem.objective(w)
        w, inv_diag = solver(penalty)
        # W A = C gives <W G, W> = <W, C> - sum_i (delta + pi_i) ||W_i||^2: the error in O(d m)
        col_sq = w.pow(2).sum(0)
        ridge = damping if penalty is None else damping + penalty
        error = float(
            problem.y_sq - (w * problem.cross).sum(dtype=torch.float64) - (ridge * col_sq).sum(dtype=torch.float64)
        )
        return _neuron_importance(w, inv_diag, gram_diag, cfg.score_exponent), w, error

    importance = importance_at(None)[0] if cfg.penalty_rounds == 0 else None
    previous, stable = None, 0
    for r in range(cfg.penalty_rounds):
        penalty = (rho * (s if column_group is None else s[column_group])).to(problem.gram.dtype)
        importance, w, error = importance_at(penalty)
        k_r = min(n_prune, max(1, round(n_prune * (r + 1) / ramp_rounds)))
        chosen = bottom_k(importance, k_r, blocks)
        s = (1 - cfg.momentum) * s + cfg.momentum * chosen.double()
        trace.objective.append(error / y_sq)
        trace.penalty.append(float((penalty * w.pow(2).sum(0)).sum(dtype=torch.float64)) / y_sq)
        trace.target_size.append(k_r)
        rho *= cfg.rho_growth
        stable = stable + 1 if previous is not None and k_r == n_prune and torch.equal(chosen, previous) else 0
        previous = chosen
        if cfg.penalty_patience and stable >= cfg.penalty_patience:
            # the mask has settled: the remaining rounds would move s geometrically towards it
            decay = (1 - cfg.momentum) ** (cfg.penalty_rounds - r - 1)
            s = decay * s + (1 - decay) * chosen.double()
            break
    assert importance is not None  # set before the loop when it runs no round
    by_importance = torch.sort(importance, stable=True).indices
    order = by_importance[torch.sort(-s[by_importance], stable=True).indices]
    if blocks is not None:
        return first_k_per_block(order, n_prune, blocks), trace
    mask = torch.zeros(n_units, dtype=torch.bool, device=s.device)
    mask[order[:n_prune]] = True
    return mask, trace


def score_select(
    problem: QuadraticLS, n_prune: int, cfg: SolverConfig, groups: Tensor | None = None, blocks: Tensor | None = None
) -> Tensor:
    """Ablation without the penalty loop: the k lowest importances of the unpenalised fit (per block)."""
    importance, _ = compensated_importance(problem, None, cfg.damping * problem.mean_diag, cfg.score_exponent, groups)
    return bottom_k(importance, n_prune, blocks)
