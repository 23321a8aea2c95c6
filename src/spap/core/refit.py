"""Final weight repair of a pruned MLP on a sample of calibration tokens.

Objective on inputs X (n, d) with dense targets Y (n, d) and fixed damping delta:

    F(theta, W, b) = 1/2 sum_n w_n ||y_n - W z(x_n; theta) - b||^2 + delta/2 ||W||_F^2,

theta = (W_up, W_gate, b_up, b_gate), token weights w_n (default 1).  ``alternating_refit`` repeats
  1. (W, b) <- argmin F                         closed form (Cholesky; Z^T Z in float32, solve in float64);
  2. ``grad_steps`` gradient steps on theta     with Armijo backtracking (each step decreases F),
so F is non-increasing round by round (up to the float32 rounding of Z^T Z, ~1e-6 relative).
Step 1 takes Z from the last accepted trial of step 2 and step 2 starts from that trial's graph, so a
round computes Z only at trial points.
``gradient_refit`` is the ablation that updates all parameters together by plain (backtracking)
gradient descent for the same number of evaluations.
With held-out rows (``Holdout``) and a patience P, both stop once the held-out error has not improved
(by at least a relative ``min_gain``) for P rounds and return the weights of the best round (the start counts as round 0, judged with its
W_down re-fit on the sample like every round's), so a refit that only fits its sample stops after P
rounds.
``perturbed_rows`` makes the refit inputs x_n + sigma rms(x_n) eps_n (targets: the dense MLP there),
so the refit also matches the dense MLP's response to small changes of its input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .linalg import QuadraticLS
from .mlp import MLPWeights

_THETA = ("up", "gate", "up_bias", "gate_bias")
_ALL = _THETA + ("down", "down_bias")

Loss = Callable[[MLPWeights, Tensor], Tensor]
"""F(weights) given z = weights.intermediate(x) (n, m) on the refit inputs x."""


def perturbed_rows(x: Tensor, sigma: float, seed: int = 0) -> Tensor:
    """x_n + sigma * rms(x_n) * eps_n with eps ~ N(0, I) (n, d), drawn on the CPU from ``seed`` (the
    same rows on every device); sigma = 0 returns ``x`` itself.  For small sigma, fitting targets
    dense(x_n + ...) adds ~sigma^2 rms(x_n)^2 ||J_dense(x_n) - J_pruned(x_n)||_F^2 to each row's error."""
    if sigma == 0:
        return x
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return x + sigma * x.float().pow(2).mean(-1, keepdim=True).sqrt() * eps.to(x.device)


def _objective(weights: MLPWeights, z: Tensor, y: Tensor, damping: float, token_weight: Tensor | None) -> Tensor:
    r2 = (y - weights.output_from_intermediate(z)).pow(2)
    fit = r2.sum() if token_weight is None else (r2 * token_weight[:, None]).sum()
    return 0.5 * fit + 0.5 * damping * weights.down.pow(2).sum()


def _weighted_sq_sum(a: Tensor, token_weight: Tensor | None) -> Tensor:
    """sum_n w_n a_n^2 per column: (n, k) -> (k,)."""
    sq = a.pow(2)
    return sq.sum(0) if token_weight is None else (sq * token_weight[:, None]).sum(0)


def _with_proximal(loss: Loss, start: MLPWeights, names: tuple[str, ...], strength: float, scale: float) -> Loss:
    """loss + strength * scale * sum_p ||p - p_0||^2 / ||p_0||^2 over the fields ``names``.

    ``scale`` is the initial objective, so strength = 1 means a 10% relative move of every updated
    matrix costs 1% of the starting error: a trust region that keeps the refit near the closed-form
    solution (0 disables it)."""
    if strength <= 0:
        return loss
    anchors = {n: getattr(start, n).detach().clone() for n in names if getattr(start, n) is not None}
    norms = {n: float(a.pow(2).sum()) or 1.0 for n, a in anchors.items()}

    def regularised(w: MLPWeights, z: Tensor) -> Tensor:
        prox = sum((getattr(w, n) - a).pow(2).sum() / norms[n] for n, a in anchors.items())
        return loss(w, z) + strength * scale * prox

    return regularised


@dataclass
class Evaluated:
    """A point of the descent: the trained fields as autograd leaves, z at them (with its graph) and
    the loss there.  ``armijo_descent`` returns its last point only while that graph is unused; handed
    to the next call it saves that call's first forward pass, and the W_down statistics in between
    can use ``z.detach()``."""

    params: dict[str, Tensor]
    z: Tensor | None  # None once the gradient at this point has been taken
    value: Tensor


def armijo_descent(
    weights: MLPWeights,
    names: tuple[str, ...],
    x: Tensor,
    loss: Loss,
    steps: int,
    lr: float | None,
    start: Evaluated | None = None,
) -> tuple[MLPWeights, float | None, float, Evaluated | None]:
    """``steps`` backtracking gradient steps on the fields ``names``; returns the weights, the next
    lr, the loss at the returned weights and, if its graph is still unused, that point (else None).

    A step is accepted only if loss(new) <= loss(old) - 1e-4 * lr * ||grad||^2 (Armijo), so the loss
    never increases.  The first lr is 5% of ||params|| / ||grad||, which is scale-free.  Trial points
    are evaluated with autograd on, so the accepted one's graph gives the next gradient without
    another forward pass (``autograd.grad`` frees that graph, so one is held at a time).  ``start``
    (the previous call's last point, same fields ``names``) replaces the forward pass at the start
    and is consumed; only fields outside ``names`` (W_down) may have changed since, as the loss is
    re-evaluated.
    """

    def evaluate(params: dict[str, Tensor]) -> Evaluated:
        trial = weights.with_fields(params)
        z = trial.intermediate(x)
        return Evaluated(params, z, loss(trial, z))

    if start is None:
        leaves = {
            n: getattr(weights, n).detach().requires_grad_(True) for n in names if getattr(weights, n) is not None
        }
        point = evaluate(leaves)
    else:  # consume ``start``: its z is released below, and the loss is re-evaluated at the new W_down
        point = start
        assert point.z is not None  # an unused point keeps its graph
        point.value = loss(weights.with_fields(point.params), point.z)
    fresh = True
    for _ in range(steps):
        grads = torch.autograd.grad(point.value, list(point.params.values()))
        point.z, fresh = None, False  # the graph is spent; only an unused point keeps z (memory)
        gnorm2 = sum(float(g.pow(2).sum()) for g in grads)
        if gnorm2 == 0.0:
            break
        if lr is None:
            pnorm = sum(float(p.detach().pow(2).sum()) for p in point.params.values()) ** 0.5
            lr = 0.05 * pnorm / gnorm2**0.5
        base = float(point.value.detach())
        for _ in range(30):
            with torch.no_grad():
                params = {n: (p - lr * g).requires_grad_(True) for (n, p), g in zip(point.params.items(), grads)}
            trial = evaluate(params)
            if float(trial.value.detach()) <= base - 1e-4 * lr * gnorm2:
                point, fresh = trial, True
                lr *= 2.0
                break
            del params, trial  # free the rejected graph before the next trial (peak: one graph)
            lr *= 0.25
        if not fresh:
            break
    final = weights.with_fields({n: p.detach() for n, p in point.params.items()})
    return final, lr, float(point.value.detach()), point if fresh else None


@dataclass
class Holdout:
    """Calibration rows the refit does not fit on: inputs x (n, d), dense targets y (n, d), token
    weights (n,) or None."""

    x: Tensor
    y: Tensor
    token_weight: Tensor | None = None
    errors: list[float] = field(default_factory=list)  # relative error of each ``error`` call, in order

    def __post_init__(self) -> None:
        self._y_sq = float(_weighted_sq_sum(self.y, self.token_weight).sum()) or 1.0

    @torch.no_grad()
    def error(self, weights: MLPWeights) -> float:
        """sum_n w_n ||y_n - mlp(x_n)||^2; appends it relative to sum_n w_n ||y_n||^2 to ``errors``."""
        error = float(_weighted_sq_sum(self.y - weights(self.x), self.token_weight).sum())
        self.errors.append(error / self._y_sq)
        return error


class _EarlyStopping:
    """Tracks the best weights by held-out error; ``stop(weights)`` is True after ``patience`` rounds
    without an improvement of at least ``min_gain`` (relative to the best error so far; a smaller
    improvement still updates the best weights).  Without held-out rows (or patience 0) it never
    stops and keeps the last.

    ``judge_start(reference)``: the weights whose held-out error the start is judged by.  The
    alternating refit passes the start's W_up/W_gate with W_down re-fit on the refit sample, as every
    later round's W_down is: the start's own W_down was fit on all calibration tokens, the held-out
    ones included, which would favour the start unfairly."""

    def __init__(self, start: MLPWeights, holdout: Holdout | None, patience: int, min_gain: float = 0.0) -> None:
        self.holdout = holdout if patience > 0 else None
        self.patience = patience
        self.min_gain = min_gain
        self.best = start
        self.best_error = float("inf")
        self.since_best = 0

    def judge_start(self, reference: MLPWeights) -> None:
        if self.holdout is not None:
            self.best_error = self.holdout.error(reference)

    def stop(self, weights: MLPWeights) -> bool:
        if self.holdout is None:
            self.best = weights
            return False
        error = self.holdout.error(weights)
        if error < self.best_error:  # the best round is kept; a gain below min_gain counts as none
            gain = 1.0 - error / self.best_error
            self.since_best = 0 if gain >= self.min_gain else self.since_best + 1
            self.best, self.best_error = weights, error
        else:
            self.since_best += 1
        return self.since_best >= self.patience


@torch.no_grad()
def _refit_objective(
    weights: MLPWeights,
    x: Tensor,
    y: Tensor,
    damping_rel: float,
    proximal: float,
    token_weight: Tensor | None,
    names: tuple[str, ...],
) -> tuple[float, Loss, float]:
    """(delta, F with the proximal term on ``names``, 1/2 sum_n w_n ||y_n||^2) for a refit start."""
    z = weights.intermediate(x)
    damping = damping_rel * float(_weighted_sq_sum(z, token_weight).mean())
    base = lambda w, z: _objective(w, z, y, damping, token_weight)  # noqa: E731
    loss = _with_proximal(base, weights, names, proximal, float(base(weights, z)))
    return damping, loss, 0.5 * float(_weighted_sq_sum(y, token_weight).sum()) or 1.0


def alternating_refit(
    weights: MLPWeights,
    x: Tensor,
    y: Tensor,
    rounds: int,
    grad_steps: int,
    damping_rel: float,
    fit_bias: bool,
    proximal: float = 0.0,
    token_weight: Tensor | None = None,
    holdout: Holdout | None = None,
    patience: int = 0,
    min_gain: float = 0.0,
) -> tuple[MLPWeights, list[float]]:
    """Alternate closed-form (W_down, b_down) and gradient steps on W_up/W_gate; returns F/F_0 history.

    x, y: (n, d) float32; token_weight: (n,) or None.  History entry r is F after round r divided by
    1/2 sum_n w_n ||y_n||^2 (F includes the proximal term, which depends on W_up/W_gate only, so the
    closed-form step stays exact); its length is the number of rounds run (early stopping, see above).
    """
    damping, loss, y_half = _refit_objective(weights, x, y, damping_rel, proximal, token_weight, _THETA)
    history: list[float] = []
    lr, point = None, None
    early = _EarlyStopping(weights, holdout, patience, min_gain)
    for r in range(rounds):
        with torch.no_grad():  # z of the last accepted step, if any, is z at the current W_up/W_gate
            z = weights.intermediate(x) if point is None or point.z is None else point.z.detach()
            problem = QuadraticLS.from_data(z, y, token_weight, product_dtype=torch.float32)
            del z
            w, b = problem.solve(damping, fit_bias=fit_bias)
            bias = b.to(x) if fit_bias and b is not None else weights.down_bias
            weights = replace(weights, down=w.to(x), down_bias=bias)
        if r == 0:  # judge the start with its W_down fit on the sample too (see _EarlyStopping)
            early.judge_start(weights)
        weights, lr, value, point = armijo_descent(weights, _THETA, x, loss, grad_steps, lr, point)
        history.append(value / y_half)
        if early.stop(weights):
            break
    return early.best, history


def gradient_refit(
    weights: MLPWeights,
    x: Tensor,
    y: Tensor,
    rounds: int,
    grad_steps: int,
    damping_rel: float,
    proximal: float = 0.0,
    token_weight: Tensor | None = None,
    holdout: Holdout | None = None,
    patience: int = 0,
    min_gain: float = 0.0,
) -> tuple[MLPWeights, list[float]]:
    """Ablation: plain backtracking gradient descent on all MLP weights, rounds * (grad_steps + 1) steps."""
    _, loss, y_half = _refit_objective(weights, x, y, damping_rel, proximal, token_weight, _ALL)
    history: list[float] = []
    lr, point = None, None
    early = _EarlyStopping(weights, holdout, patience, min_gain)
    early.judge_start(weights)
    for _ in range(rounds):
        weights, lr, value, point = armijo_descent(weights, _ALL, x, loss, grad_steps + 1, lr, point)
        history.append(value / y_half)
        if early.stop(weights):
            break
    return early.best, history
