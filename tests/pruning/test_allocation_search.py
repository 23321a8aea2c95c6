"""``allocation="search"``: every rule is measured on held-out calibration windows and the run prunes
with the one of least loss, exactly as a run that names that rule."""

from __future__ import annotations

import pytest

import spap
from spap.pruning.allocation_search import SEARCHED
from spap.pruning.budget import held_out_loss, split_held_out

from ..conftest import tiny_ids, tiny_model


def _cfg(allocation: str) -> spap.PruneConfig:
    return spap.PruneConfig(
        sparsity=0.4,
        allocation=allocation,
        runtime=spap.RuntimeConfig(compute_dtype="float32", device="cpu"),
        solver=spap.SolverConfig(refit="ls"),
    )


def test_the_search_prunes_with_the_rule_of_least_held_out_loss():
    ids = tiny_ids(10, 24)
    model = tiny_model("llama")
    report = spap.prune(model, config=_cfg("search"), calibration_ids=ids)
    record = report.extra["allocation_search"]
    losses = record["held_out_loss"]
    assert set(losses) == set(SEARCHED) and all(loss > 0 for loss in losses.values())
    assert record["chosen"] == min(SEARCHED, key=lambda rule: losses[rule]) == report.config["allocation"]
    assert record["held_out_windows"] == 2 and report.calibration_shape[0] == 8  # held out: never calibrates
    assert report.seconds["total"] > report.seconds["allocation_search"] > 0

    # the same as naming the chosen rule on the same calibration windows; its held-out loss as measured
    kept, held = split_held_out(ids, 0.2, seed=_cfg("search").seed)
    named = tiny_model("llama")
    again = spap.prune(named, config=_cfg(record["chosen"]), calibration_ids=kept)
    assert again.widths == report.widths
    assert held_out_loss(named, held, 4, named.device, named.dtype) == pytest.approx(losses[record["chosen"]])


def test_search_with_target_ratio_is_refused():
    with pytest.raises(ValueError, match="allocation 'search' with target_ratio"):
        spap.PruneConfig(allocation="search", target_ratio=0.3)
