"""The recipe ``spap prune`` runs without flags writes a checkpoint stock transformers loads, for every
supported family, and ``--method spap`` is SPAP as published (penalty-loop selection, closed-form
W_down, alternating refit of up/gate/down)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import spap
from spap.cli.parser import build_parser, config_from_args

from ..conftest import FAMILIES, tiny_ids, tiny_model


def _default_config(*flags: str) -> spap.PruneConfig:
    args = build_parser().parse_args(["prune", "--out", "unused", *flags])
    args.explicit = set()
    return config_from_args(args)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_default_recipe_writes_a_stock_checkpoint(family, tmp_path):
    cfg = _default_config()
    cfg.runtime.compute_dtype, cfg.runtime.device = "float32", "cpu"
    cfg.solver.refit_rounds = 2  # the recipe's rules, fewer rounds: a test of shapes and loading
    model = tiny_model(family)
    ids = tiny_ids()
    spap.prune(model, config=cfg, calibration_ids=ids)
    out = spap.save_pruned(model, tmp_path / "out")
    assert not (out / "modeling_spap.py").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_method_spap_is_the_published_recipe():
    solver = _default_config("--method", "spap").solver
    assert (solver.selection_rule, solver.refit_rule) == ("penalty", "alternating")
    assert solver.penalty_rounds > 0 and solver.rho_growth > 1 and solver.refit_rounds > 0
    assert _default_config("--method", "spap").allocation_rule == "uniform"
