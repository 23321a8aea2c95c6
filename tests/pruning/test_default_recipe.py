"""The recipe ``spap prune`` runs without flags (spap-ls: SPAP's selection and closed-form W_down, chosen
on the quality matrix) writes a checkpoint stock transformers loads, for every supported family, and
``--method spap`` is SPAP as published (penalty-loop selection, closed-form W_down, alternating refit
of up/gate/down)."""

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


def test_the_default_is_spap_without_the_refit():
    cfg = _default_config()
    assert cfg.solver.method == "spap-ls" and cfg.allocation_rule == "uniform"
    assert (cfg.solver.selection_rule, cfg.solver.refit_rule) == ("penalty", "ls")
    assert not cfg.solver.needs_sample  # no stored rows: the refit's memory and time are not spent
