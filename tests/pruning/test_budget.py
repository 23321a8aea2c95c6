"""One parameter budget: every candidate mix removes the asked fraction of parameters, the search
measures each on held-out calibration windows and prunes at the best one."""

from __future__ import annotations

import pytest
import torch

import spap
from spap.adapters import get_adapter
from spap.pruning import budget

from ..conftest import tiny_ids, tiny_model


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_every_candidate_removes_the_budget(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    total, per_layer, per_neuron = budget.layer_costs(model, adapter)
    assert sum(per_layer) < total and all(n > 0 for n in per_neuron)
    found = budget.candidates(model, adapter, 0.25)
    depths = [c.drop_layers for c in found if not c.kv_groups_removed]
    assert depths[0] == 0 and depths == sorted(set(depths))
    for candidate in found:
        assert candidate.parameters_removed == pytest.approx(0.25 * total, abs=len(per_layer) * max(per_neuron))


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_pruning_at_each_candidate_removes_what_it_predicts(family):
    """The accounting against real pruning: layers, KV groups (q/k/v rows, o columns) and neurons."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    _, per_layer, per_neuron = budget.layer_costs(model, adapter)
    found = budget.candidates(model, adapter, 0.35)
    assert any(c.kv_groups_removed for c in found) == (family != "opt")  # OPT: heads would need remote code
    base = spap.PruneConfig(
        runtime=spap.RuntimeConfig(compute_dtype="float32", device="cpu"), solver=spap.SolverConfig(refit="ls")
    )
    for candidate in found:
        trial = tiny_model(family)
        before = sum(p.numel() for p in trial.parameters())
        report = spap.prune(trial, config=candidate.config(base), calibration_ids=tiny_ids(4, 16))
        removed = before - report.parameters_after
        assert abs(removed - candidate.parameters_removed) <= len(per_layer) * max(per_neuron), candidate


def test_held_out_windows_are_disjoint_from_calibration():
    ids = torch.arange(40).reshape(10, 4)
    kept, held = budget.split_held_out(ids, 0.2, seed=0)
    assert kept.shape[0] == 8 and held.shape[0] == 2
    assert not set(kept[:, 0].tolist()) & set(held[:, 0].tolist())


def test_the_search_prunes_at_the_mix_of_least_held_out_loss():
    model = tiny_model("llama")
    before = sum(p.numel() for p in model.parameters())
    cfg = spap.PruneConfig(
        target_ratio=0.35, runtime=spap.RuntimeConfig(compute_dtype="float32", device="cpu"), sparsity=0.9
    )
    report = spap.prune(model, config=cfg, calibration_ids=tiny_ids(10, 24))
    record = report.extra["budget"]
    losses = [c["held_out_loss"] for c in record["candidates"]]
    assert len(losses) >= 2 and all(loss > 0 for loss in losses)
    assert record["chosen"]["held_out_loss"] == min(losses) and record["held_out_windows"] == 2
    assert report.config["sparsity"] == record["chosen"]["sparsity"] != 0.9  # the search sets it
    assert report.config["drop_layers"] == record["chosen"]["drop_layers"]
    _, per_layer, per_neuron = budget.layer_costs(tiny_model("llama"), get_adapter(tiny_model("llama")))
    rounding = len(per_layer) * max(per_neuron)  # one MLP neuron per layer
    assert abs(report.parameters_after - 0.65 * before) <= rounding
    assert report.calibration_shape[0] == 8  # the held-out windows never calibrate
    search = report.seconds["budget_search"]
    assert search > 0 and report.seconds["total"] > search  # the search counts in the run's time


def test_an_impossible_budget_is_refused():
    with pytest.raises(ValueError, match="target_ratio"):
        spap.PruneConfig(target_ratio=1.0)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="cannot be met"):
        budget.candidates(model, get_adapter(model), 0.99)


def test_the_cli_takes_a_parameter_budget(tiny_checkpoint, tmp_path, capsys):
    import json

    from spap.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "out"
    args = ["prune", str(tiny_checkpoint), "--target-ratio", "0.35", "--calib", str(calib), "--n-samples", "8"]
    assert main([*args, "--seq-len", "32", "--out", str(out)]) == 0
    record = json.loads((out / "pruning.json").read_text())
    chosen = record["extra"]["budget"]["chosen"]
    assert record["config"]["target_ratio"] == 0.35 and record["config"]["sparsity"] == chosen["sparsity"]
    assert record["parameters_after"] == pytest.approx(0.65 * record["parameters_before"], rel=0.03)
    assert "pruned" in capsys.readouterr().out


@pytest.mark.parametrize("allocation", ["angular", "global"])
def test_the_budget_holds_on_the_any_width_track(allocation, tmp_path):
    """--target-ratio with a per-layer allocation: the mix is searched uniform, the final run spreads
    the same neuron count over the layers; the checkpoint reloads with spap.load_pretrained."""
    model = tiny_model("llama")
    before = sum(p.numel() for p in model.parameters())
    cfg = spap.PruneConfig(
        target_ratio=0.35,
        allocation=allocation,
        runtime=spap.RuntimeConfig(compute_dtype="float32", device="cpu"),
        solver=spap.SolverConfig(refit="ls"),
    )
    report = spap.prune(model, config=cfg, calibration_ids=tiny_ids(10, 24))
    widths = report.widths
    assert len(set(widths)) > 1  # per-layer widths
    _, per_layer, per_neuron = budget.layer_costs(tiny_model("llama"), get_adapter(tiny_model("llama")))
    assert abs(report.parameters_after - 0.65 * before) <= len(per_layer) * max(per_neuron)
    spap.save_pruned(model, tmp_path / "out", report=report.to_dict())
    reloaded = spap.load_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = tiny_ids(1, 12)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_wide_mlps_meet_the_budget_in_multiples_of_64():
    """MLPs >= 1024 wide: the candidates are compared at exact widths, the chosen mix's width is then
    rounded to a multiple of 64 (odd widths prefill slower than dense in llama.cpp), which moves the
    count by at most half a multiple of neurons per layer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from spap.config import AUTO_WIDTH_MULTIPLE

    config = LlamaConfig(
        vocab_size=512, hidden_size=32, num_hidden_layers=3, intermediate_size=1024, num_attention_heads=4
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    before = sum(p.numel() for p in model.parameters())
    _, per_layer, per_neuron = budget.layer_costs(model, get_adapter(model))
    cfg = spap.PruneConfig(
        target_ratio=0.3,
        runtime=spap.RuntimeConfig(compute_dtype="float32", device="cpu"),
        solver=spap.SolverConfig(refit="ls"),
    )
    report = spap.prune(model, config=cfg, calibration_ids=tiny_ids(10, 24))
    assert all(width % AUTO_WIDTH_MULTIPLE == 0 for width in report.widths) and report.widths[0] < 1024
    half_a_multiple = len(per_layer) * max(per_neuron) * AUTO_WIDTH_MULTIPLE // 2
    assert abs(report.parameters_after - 0.7 * before) <= half_a_multiple
    candidates = report.extra["budget"]["candidates"]
    assert all(
        c["parameters_removed"] == pytest.approx(0.3 * before, abs=len(per_layer) * max(per_neuron)) for c in candidates
    )
