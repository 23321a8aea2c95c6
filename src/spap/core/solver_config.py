"""Hyperparameters of the per-MLP solvers (pure data, JSON round-trip via dataclasses.asdict)."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from typing import Any

import torch

from .methods import get_method, method_names

METHODS = method_names()

SELECTIONS = ("penalty", "score")
REFITS = ("alternating", "gd", "ls", "bias", "none")
SOLVE_DTYPES = ("auto", "float64", "float32")


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    expert: bool = False,
    experimental: bool = False,
) -> Any:
    """A dataclass field with its command-line form in ``metadata``: ``flag`` (default ``--name``),
    ``help``, ``choices``, ``metavar``; ``expert`` flags are listed by ``--help-all`` only, and
    ``experimental`` ones there too, in their own group (study knobs that lost)."""
    meta = dict(help=help, flag=flag, choices=choices, metavar=metavar, expert=expert or experimental)
    return field(default=default, metadata={**meta, "experimental": experimental})


@dataclass
class SolverConfig:
    """How one MLP is pruned.  Defaults were chosen on SmolLM2-135M (see docs/hyperparameters.md).

    method:          a registered method (spap.core.methods): spap-ls (default) | spap | magnitude | wanda-sp |
                     fasp | flap | cfsp.
    selection:       override of the method's selection rule: "penalty" (SPAP loop) or "score".
    refit:           override of the reconstruction: "alternating" (closed-form W_down + gradient
                     steps on W_up/W_gate, repeated), "gd" (plain gradient descent on all three),
                     "ls" (closed-form W_down only), "bias" (FLAP mean compensation), "none".
    penalty_rounds:  K, rounds of the penalty loop.
    rho_init:        rho_0 relative to mean(diag(G)); rho_k = rho_0 * rho_growth**k.
    rho_growth:      tau > 1.
    momentum:        alpha in (0, 1]: s <- (1 - alpha) s + alpha * 1[bottom-k_r importances].
    score_exponent:  t: importance ||W[:, i]||^2 G_ii^(1-t) / ([A^-1]_ii)^t (t=1: compensated
                     removal cost, t=0: uncompensated cost); see spap.core.selection.
    ramp:            fraction of the K rounds over which the target count k_r grows to k.
    penalty_patience: stop the penalty loop once the bottom-k set at the full count k has not
                     changed for this many rounds (the remaining momentum updates are applied in
                     closed form); 0 runs every round.
    damping:         ridge delta relative to mean(diag(G)) in every least-squares solve.
    refit_rounds:    rounds of the final alternating minimisation.
    refit_grad_steps: gradient steps on W_up/W_gate per refit round (Armijo backtracking).
    refit_tokens:    calibration tokens (random subset) used by the refit.
    refit_patience:  early stopping: after each round the refit's error on ``refit_holdout_tokens``
                     other calibration tokens is measured, and the refit stops once it has not
                     improved for this many rounds, returning the best round's weights (0: run
                     every round, no held-out rows).
    refit_min_gain:  a round whose held-out error is less than this fraction below the best so far
                     counts as no improvement for ``refit_patience`` (its weights are still kept if
                     best); 0: any decrease counts.
    refit_proximal:  trust-region strength keeping refit weights near the closed-form start
                     (relative units, see spap.core.refit; 0 disables).
    refit_input_noise: sigma >= 0: the refit fits on inputs x + sigma rms(x) eps, eps ~ N(0, I), with
                     the dense MLP's outputs there as targets (one seeded draw per sample row;
                     selection and the final closed-form W_down use the clean tokens; 0 disables).
    refit_safeguard: keep the refit only if, after the final closed-form W_down, it lowers the
                     objective on *all* calibration tokens (the refit is monotone on its token
                     sample only); otherwise fall back to the closed-form weights.
    fit_bias:        "auto" (refit the down bias only where the model has one), "yes", "no".
    solve_dtype:     dtype of the Gram and cross statistics and of every solve on them: "float64", or
                     "float32" (half the m x m state); "auto": float64 unless the host-memory budget
                     needs float32 (``runtime.memory``; resolved before the run).
    """

    method: str = option(
        "spap-ls", "spap-ls: SPAP without the refit (default); spap: as published; the rest: baselines", choices=METHODS
    )
    selection: str | None = option(None, "override the method's selection rule", choices=SELECTIONS, expert=True)
    refit: str | None = option(None, "override the method's reconstruction", choices=REFITS)
    penalty_rounds: int = option(30, "K, penalty-loop rounds", expert=True)
    rho_init: float = option(0.1, "rho_0 relative to mean diag(G)", expert=True)
    rho_growth: float = option(1.3, "tau, rho multiplier per round", expert=True)
    momentum: float = option(0.3, "alpha, soft-mask momentum", expert=True)
    score_exponent: float = option(0.5, "t, importance exponent", expert=True)
    ramp: float = option(0.6, "fraction of rounds over which the target count grows to k", expert=True)
    penalty_patience: int = option(
        2, "stop the penalty loop once the full-size mask is unchanged this many rounds (0: all rounds)", expert=True
    )
    damping: float = option(1e-2, "ridge relative to mean diag(G)", expert=True)
    refit_rounds: int = option(20, "final alternating-minimisation rounds", expert=True)
    refit_grad_steps: int = option(3, "gradient steps on W_up/W_gate per round", expert=True)
    refit_tokens: int = option(8192, "calibration tokens used by the refit", expert=True)
    refit_patience: int = option(
        1, "stop the refit after this many rounds without held-out improvement (0: all rounds)", expert=True
    )
    refit_holdout_tokens: int = option(8192, "calibration tokens the refit's early stopping measures on", expert=True)
    refit_min_gain: float = option(
        1e-3, "a round must lower the held-out error by this fraction to count as improving", expert=True
    )
    refit_proximal: float = option(0.0, "trust-region strength of the refit (0: off)", experimental=True)
    refit_input_noise: float = option(
        0.0, "sigma: refit on inputs x + sigma rms(x) eps, dense targets there (0: off)", experimental=True
    )
    refit_safeguard: bool = option(
        True,
        "keep the refit even where it raises the objective on all calibration tokens",
        flag="--no-refit-safeguard",
        expert=True,
    )
    fit_bias: str = option(
        "auto",
        "refit the down bias: auto (where the model has one), yes, no",
        choices=("auto", "yes", "no"),
        expert=True,
    )

    solve_dtype: str = option(
        "auto",
        "Gram statistics and solves in float64, or float32 (half the memory); auto: float64 unless "
        "--max-host-memory needs float32",
        choices=SOLVE_DTYPES,
        expert=True,
    )

    def __post_init__(self) -> None:
        get_method(self.method)  # ValueError naming the choices
        if self.solve_dtype not in SOLVE_DTYPES:
            raise ValueError(f"unknown solve_dtype {self.solve_dtype!r}; choose one of {', '.join(SOLVE_DTYPES)}")
        if self.selection is not None and self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {self.selection!r}; choose one of {', '.join(SELECTIONS)}")
        if self.refit is not None and self.refit not in REFITS:
            raise ValueError(f"unknown refit {self.refit!r}; choose one of {', '.join(REFITS)}")
        if self.fit_bias not in ("auto", "yes", "no"):
            raise ValueError("fit_bias must be 'auto', 'yes' or 'no'")
        if not 0 < self.momentum <= 1:
            raise ValueError("momentum must be in (0, 1]")
        if not 0 < self.ramp <= 1:
            raise ValueError("ramp must be in (0, 1]")
        if self.rho_growth < 1 or self.rho_init < 0 or self.damping < 0:
            raise ValueError("need rho_growth >= 1, rho_init >= 0, damping >= 0")
        if self.refit_patience < 0 or self.refit_holdout_tokens < 0 or self.penalty_patience < 0:
            raise ValueError("penalty_patience, refit_patience and refit_holdout_tokens must be >= 0")
        if not 0 <= self.refit_min_gain < 1:
            raise ValueError(f"refit_min_gain must be in [0, 1), got {self.refit_min_gain}")
        if not self.refit_input_noise >= 0:  # also rejects NaN
            raise ValueError(f"refit_input_noise must be >= 0, got {self.refit_input_noise}")

    @property
    def matrix_dtype(self) -> torch.dtype:
        """dtype of G, C and the solves ("auto" unresolved: float64)."""
        return torch.float32 if self.solve_dtype == "float32" else torch.float64

    @property
    def selection_rule(self) -> str:
        return self.selection or get_method(self.method).selection

    @property
    def refit_rule(self) -> str:
        return self.refit or get_method(self.method).refit

    @property
    def needs_gram(self) -> bool:
        """Whether the solve needs the full Gram / cross statistics (SPAP's selection or any least
        squares); score rules with no or a bias-only reconstruction need diag(G) and sum z only."""
        return get_method(self.method).score is None or self.refit_rule in ("ls", "alternating", "gd")

    @property
    def holdout_tokens(self) -> int:
        """Held-out rows the refit's early stopping needs (0 without early stopping)."""
        return self.refit_holdout_tokens if self.needs_sample and self.refit_patience > 0 else 0

    @property
    def needs_sample(self) -> bool:
        """Whether the solver needs stored input rows (gradient-based refits)."""
        return self.refit_rule in ("alternating", "gd") and self.refit_rounds > 0
