"""The registry of pruning methods: how each chooses neurons and repairs what is left.

A method is a selection rule ("penalty": SPAP's relaxed mixed-integer loop on the least-squares
problem; "score": the bottom k of a per-neuron importance), a reconstruction (see
``SolverConfig.refit``) and the allocation that ``allocation="auto"`` means for it.  Adding a method is
one ``register(Method(...))`` in the module that holds its math (the baselines: ``spap.core.scores``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from .stats import MLPStatistics

Score = Callable[[Tensor, MLPStatistics], Tensor]
"""Importance (m,) float64 of each neuron (higher = kept) from W_down (d, m) and its input statistics."""


@dataclass(frozen=True)
class Method:
    name: str
    selection: str  # "penalty" or "score"
    refit: str  # "alternating", "gd", "ls", "bias" or "none"
    allocation: str = "uniform"  # what allocation "auto" resolves to
    score: Score | None = None  # the importance a "score" selection ranks by (None: SPAP's own)
    summary: str = ""


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    if method.selection not in ("penalty", "score"):
        raise ValueError(f"method {method.name!r}: unknown selection {method.selection!r}")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``; ValueError naming the choices otherwise."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(method_names())}")
    return _REGISTRY[name]


def method_names() -> tuple[str, ...]:
    _load_builtin()
    return tuple(_REGISTRY)


def _load_builtin() -> None:
    from . import scores  # noqa: F401  (registers the baselines)


register(
    Method(
        "spap",
        "penalty",
        "alternating",
        summary="SPAP as published (arXiv 2505.03373): penalty-loop selection, closed-form W_down, "
        "alternating refit of up/gate/down",
    )
)
register(
    Method(
        "spap-ls",
        "penalty",
        "ls",
        summary="spap's default: SPAP's selection and closed-form W_down without the alternating refit, which "
        "gained < 1% held-out on the quality matrix at 2-4x the time (docs/studies/quality-matrix.md)",
    )
)
