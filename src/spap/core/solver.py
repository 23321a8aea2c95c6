"""Prune one MLP: select neurons, remove them, reconstruct the remaining weights."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .linalg import QuadraticLS
from .methods import get_method
from .mlp import MLPWeights
from .refit import Holdout, alternating_refit, gradient_refit, perturbed_rows
from .scores import bottom_k
from .selection import penalty_select, score_select
from .solver_config import SolverConfig
from .stats import MLPStatistics


@dataclass
class MLPPruneResult:
    """Outcome for one MLP: the pruned weights (float32), kept indices and diagnostics.

    ``needs_final_ls``: W_up/W_gate were refit on a token sample; the caller should collect
    statistics of the new intermediate activations on all tokens and call ``finalize_down``, which
    keeps ``closed_form`` (the weights before the refit) if the refit did not lower the all-token
    objective and ``SolverConfig.refit_safeguard`` is on.
    """

    weights: MLPWeights
    kept: Tensor  # (m - k,) sorted indices into the original neurons
    error_ls: float | None  # relative error on all calibration tokens after selection + reconstruction
    # (None for score rules, whose statistics hold no Gram matrix)
    refit_history: list[float] = field(default_factory=list)
    penalty_objective: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    needs_final_ls: bool = False
    error_refit: float | None = None  # relative error after the refit and the final closed-form W_down
    closed_form: MLPWeights | None = None  # weights before the refit (selection + closed-form W_down)
    refit_accepted: bool | None = None  # None: no refit; False: closed form kept (early stopping or safeguard)
    refit_holdout: list[float] = field(default_factory=list)  # relative held-out error: start, then each round


def resolve_fit_bias(cfg: SolverConfig, weights: MLPWeights) -> bool:
    return cfg.fit_bias == "yes" or (cfg.fit_bias == "auto" and weights.down_bias is not None)


def select_neurons(
    weights: MLPWeights, stats: MLPStatistics, n_prune: int, cfg: SolverConfig
) -> tuple[Tensor, list[float]]:
    """Bool mask (m,) of neurons to remove and the penalty-loop objective trace (empty for scores)."""
    score = get_method(cfg.method).score
    if score is not None:
        return bottom_k(score(weights.down.double(), stats), n_prune), []
    problem = QuadraticLS.from_stats(stats)
    if resolve_fit_bias(cfg, weights):
        problem = problem.centered()
    if cfg.selection_rule == "penalty":
        mask, trace = penalty_select(problem, n_prune, cfg)
        return mask, trace.objective
    return score_select(problem, n_prune, cfg), []


def least_squares_down(
    weights: MLPWeights, stats: MLPStatistics, cfg: SolverConfig, fit_bias: bool, keep: Tensor | None = None
) -> tuple[MLPWeights, float]:
    """Closed-form W_down (and bias if ``fit_bias``) for ``weights`` from ``stats``; relative error."""
    full = QuadraticLS.from_stats(stats)
    problem = full if keep is None else full.restrict(keep)
    w, b = problem.solve(cfg.damping * full.mean_diag, fit_bias=fit_bias)
    new = replace(weights, down=w.float().to(weights.down.device))
    if fit_bias and b is not None:
        new = replace(new, down_bias=b.float().to(weights.down.device))
    return new, problem.relative_error(w, b if fit_bias else _bias(new, problem))


def prune_mlp(
    weights: MLPWeights,
    stats: MLPStatistics,
    n_prune: int,
    cfg: SolverConfig,
    sample_x: Tensor | None = None,
    refit_dtype: torch.dtype | None = None,
    sample_offset: Tensor | None = None,
    sample_weight: Tensor | None = None,
    holdout_mask: Tensor | None = None,
) -> MLPPruneResult:
    """Remove ``n_prune`` neurons from ``weights`` (float32) using calibration ``stats``.

    ``sample_x`` (n, d): stored calibration inputs, required by the "alternating" and "gd" refits.
    ``refit_dtype``: matmul dtype of the refit's gradient steps (autocast), e.g. bfloat16.
    ``sample_offset`` (n, d): target correction of the sample rows (targets = dense(x) + offset),
    matching the offsets the statistics were accumulated with; ``sample_weight`` (n,): their token
    weights, matching the weights of the statistics (None: unweighted).  ``holdout_mask`` (n,) bool:
    sample rows the refit does not fit on but measures its early stopping on.
    """
    m = weights.width
    if not 0 <= n_prune < m:
        raise ValueError(f"cannot prune {n_prune} of {m} neurons (need 0 <= k < m)")
    weights = weights.to(dtype=torch.float32)
    timings: dict[str, float] = {}
    if n_prune == 0:  # the dense weights are the exact optimum: change nothing
        return MLPPruneResult(weights, torch.arange(m), 0.0, seconds=timings)

    t0 = time.perf_counter()
    pruned, penalty_trace = select_neurons(weights, stats, n_prune, cfg)
    pruned = pruned.cpu()
    kept = torch.nonzero(~pruned).flatten()
    timings["select"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fit_bias = resolve_fit_bias(cfg, weights)
    new = weights.select(kept)
    rule = cfg.refit_rule
    if rule in ("ls", "alternating", "gd"):
        new, error = least_squares_down(new, stats, cfg, fit_bias, kept)
    else:
        if rule == "bias":
            comp = weights.down[:, pruned].double() @ stats.z_mean.to(weights.down.device, torch.float64)[pruned]
            base = torch.zeros_like(comp) if weights.down_bias is None else weights.down_bias.double()
            new = replace(new, down_bias=(base + comp).float())
        error = None  # statistics without the Gram matrix cannot give it; the pipeline measures the error
        if stats.full:
            problem = QuadraticLS.from_stats(stats, kept)
            error = problem.relative_error(new.down.to(problem.gram.device), _bias(new, problem))
    timings["reconstruct"] = time.perf_counter() - t0

    history: list[float] = []
    refit = rule in ("alternating", "gd") and cfg.refit_rounds > 0
    closed_form = new if refit else None
    holdout: Holdout | None = None
    if refit:
        if sample_x is None:
            raise ValueError(f"refit {rule!r} needs stored calibration inputs (sample_x)")
        t0 = time.perf_counter()
        device = weights.up.device  # rows are kept on the host; solve where W is
        rows = [t if t is None else t.to(device, torch.float32) for t in (sample_x, sample_offset, sample_weight)]
        fit, held = _split_rows(rows, holdout_mask)
        x, offset, token_weight = fit
        x = perturbed_rows(x, cfg.refit_input_noise)  # targets below: the dense MLP at the same rows
        use_autocast = refit_dtype is not None and refit_dtype != torch.float32
        # no cast cache: it would keep every trial point of the line search (a fresh leaf each) alive
        # until the context exits, a copy of W_up/W_gate per trial
        ctx = torch.autocast(x.device.type, dtype=refit_dtype, cache_enabled=False) if use_autocast else nullcontext()
        with ctx:
            with torch.no_grad():  # dense targets in the refit's matmul dtype, as the statistics' targets
                y = _targets(weights, x, offset)
                holdout = None if held is None else Holdout(held[0], _targets(weights, held[0], held[1]), held[2])
            if rule == "alternating":
                new, history = alternating_refit(
                    new,
                    x,
                    y,
                    cfg.refit_rounds,
                    cfg.refit_grad_steps,
                    cfg.damping,
                    fit_bias,
                    cfg.refit_proximal,
                    token_weight,
                    holdout,
                    cfg.refit_patience,
                    cfg.refit_min_gain,
                )
            else:
                new, history = gradient_refit(
                    new,
                    x,
                    y,
                    cfg.refit_rounds,
                    cfg.refit_grad_steps,
                    cfg.damping,
                    cfg.refit_proximal,
                    token_weight,
                    holdout,
                    cfg.refit_patience,
                    cfg.refit_min_gain,
                )
        timings["refit"] = time.perf_counter() - t0
    held_errors = [] if holdout is None else holdout.errors
    if refit and new is closed_form:  # early stopping kept the start: nothing to re-fit on all tokens
        return MLPPruneResult(
            new, kept, error, history, penalty_trace, timings, refit_accepted=False, refit_holdout=held_errors
        )
    return MLPPruneResult(
        new,
        kept,
        error,
        history,
        penalty_trace,
        timings,
        needs_final_ls=refit,
        closed_form=closed_form,
        refit_holdout=held_errors,
    )


def _targets(weights: MLPWeights, x: Tensor, offset: Tensor | None) -> Tensor:
    """dense(x) (+ offset), float32 (n, d)."""
    y = weights(x).float()
    return y if offset is None else y + offset


Rows = list  # [x (n, d), offset (n, d) or None, token weight (n,) or None]


def _split_rows(rows: Rows, holdout_mask: Tensor | None) -> tuple[Rows, Rows | None]:
    """(fit rows, held-out rows or None) of the sample."""
    if holdout_mask is None:
        return rows, None
    mask = holdout_mask.to(rows[0].device)
    return [None if t is None else t[~mask] for t in rows], [None if t is None else t[mask] for t in rows]


def finalize_down(result: MLPPruneResult, stats: MLPStatistics, cfg: SolverConfig, fit_bias: bool) -> MLPPruneResult:
    """Closed-form W_down on all calibration tokens for refit W_up/W_gate (statistics of the new z).

    Safeguard (``cfg.refit_safeguard``): if the resulting relative error on all tokens exceeds
    ``result.error_ls`` (the closed form before the refit, same tokens, same weighting), return the
    closed-form weights instead; ``error_refit`` still records the rejected refit's error."""
    weights, error = least_squares_down(result.weights, stats, cfg, fit_bias)
    closed_form, error_ls = result.closed_form, result.error_ls
    accepted = not (cfg.refit_safeguard and closed_form is not None and error_ls is not None and error > error_ls)
    if not accepted and closed_form is not None:
        weights = closed_form
    return replace(result, weights=weights, error_refit=error, needs_final_ls=False, refit_accepted=accepted)


def _bias(weights: MLPWeights, problem: QuadraticLS) -> Tensor | None:
    return None if weights.down_bias is None else weights.down_bias.to(problem.gram.device)
