"""The method registry: every method's rules reach the solver, and a method added with one
``register`` call prunes a model end to end."""

from __future__ import annotations

import pytest
import torch

import spap
from spap.config import PruneConfig, RuntimeConfig
from spap.core import methods
from spap.core.methods import Method, get_method, method_names

from ..conftest import tiny_ids, tiny_model


@pytest.mark.parametrize("name", method_names())
def test_each_method_is_its_registered_rules(name):
    method, solver = get_method(name), spap.SolverConfig(method=name)
    assert (solver.selection_rule, solver.refit_rule) == (method.selection, method.refit)
    assert PruneConfig(solver=solver).allocation_rule == method.allocation
    assert solver.needs_gram == (method.score is None or method.refit in ("ls", "alternating", "gd"))


def test_an_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="unknown method 'nope'; choose one of spap, "):
        spap.SolverConfig(method="nope")


@pytest.fixture
def last_neurons_first():
    """A method that removes the highest-indexed neurons (importance = -index), registered for one test."""
    method = methods.register(
        Method("last-first", "score", "none", score=lambda w, stats: -torch.arange(w.shape[1], dtype=torch.float64))
    )
    yield method
    del methods._REGISTRY[method.name]


def test_a_registered_method_prunes_end_to_end(last_neurons_first):
    model = tiny_model("llama")
    width = model.config.intermediate_size
    up = [layer.mlp.up_proj.weight.detach().clone() for layer in model.model.layers]
    cfg = PruneConfig(
        sparsity=0.25, solver=spap.SolverConfig(method="last-first"), runtime=RuntimeConfig(compute_dtype="float32")
    )
    spap.prune(model, config=cfg, calibration_ids=tiny_ids())
    kept = width - round(0.25 * width)
    for layer, before in zip(model.model.layers, up, strict=True):
        torch.testing.assert_close(layer.mlp.up_proj.weight, before[:kept])  # the first neurons, unchanged
