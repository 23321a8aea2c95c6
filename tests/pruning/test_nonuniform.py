import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import spap
from spap.adapters import get_adapter
from spap.config import PruneConfig, RuntimeConfig
from spap.core import SolverConfig

from ..conftest import tiny_ids, tiny_model
from .test_pipeline import fast_config, logits


def nonuniform(family):
    model, ids = tiny_model(family), tiny_ids()
    adapter = get_adapter(model)
    widths = [adapter.mlp_width(layer) for layer in adapter.decoder_layers(model)]
    counts = [widths[0] // 5, widths[1] // 2, 3]
    spap.prune(model, config=fast_config(0.3), calibration_ids=ids, n_prune=counts)
    return model, ids, [m - k for m, k in zip(widths, counts)]


def test_nonuniform_save_load_identical_logits(family, tmp_path):
    model, ids, kept = nonuniform(family)
    out = spap.save_pruned(model, tmp_path / "nu")
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_spap.SpapForCausalLM"
    assert (out / "modeling_spap.py").is_file()
    expected = logits(model, ids)
    assert torch.equal(logits(spap.load_pretrained(out), ids), expected)
    # without spap: transformers' remote-code path runs the copied modeling_spap.py
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert torch.equal(logits(remote, ids), expected)
    adapter = get_adapter(remote)
    assert [adapter.mlp_width(layer) for layer in adapter.decoder_layers(remote)] == kept


def test_pad_to_uniform_loads_with_stock_transformers(tmp_path):
    model, ids, kept = nonuniform("llama")
    expected = logits(model, ids)
    out = spap.save_pruned(model, tmp_path / "padded", pad_to_uniform=True)
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.intermediate_size == max(kept)
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("allocation_rule", ["structprune", "global", "angular"])
def test_global_allocations_meet_the_budget_in_the_pipeline(allocation_rule):
    model, ids = tiny_model("llama"), tiny_ids(n=8, seq_len=32)
    cfg = PruneConfig(
        sparsity=0.4,
        allocation=allocation_rule,
        runtime=RuntimeConfig(compute_dtype="float32"),
        max_sparsity=0.8,
        solver=SolverConfig(refit="ls"),
    )
    report = spap.prune(model, config=cfg, calibration_ids=ids)
    removed = sum(layer.width_before - layer.width_after for layer in report.layers)
    assert removed == round(0.4 * 3 * 48)
    assert all(layer.width_after >= 48 - int(0.8 * 48) - 1 for layer in report.layers)
    assert report.extra["allocation"]["counts"] == [r.width_before - r.width_after for r in report.layers]


def test_angular_distances_are_those_of_the_dense_blocks():
    model, ids = tiny_model("llama"), tiny_ids(n=4, seq_len=16)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states  # the last one is after the final norm
    expected = [
        float((torch.arccos(F.cosine_similarity(a, b, dim=-1).clamp(-1, 1)) / torch.pi).mean())
        for a, b in zip(hidden[:-2], hidden[1:-1])
    ]
    cfg = PruneConfig(sparsity=0.3, runtime=RuntimeConfig(compute_dtype="float32"), solver=SolverConfig(method="cfsp"))
    report = spap.prune(model, config=cfg, calibration_ids=ids)
    measured = report.extra["allocation"]["angular_distances"]
    assert "energies" not in report.extra["allocation"]  # the angular rule needs no MLP statistics
    torch.testing.assert_close(torch.tensor(measured[:-1]), torch.tensor(expected), rtol=1e-4, atol=1e-6)
    assert min(expected) > 0


def test_width_multiple_under_uniform_allocation_keeps_one_stock_width(tmp_path):
    model, ids = tiny_model("llama"), tiny_ids()
    cfg = PruneConfig(
        sparsity=0.3, width_multiple=8, runtime=RuntimeConfig(compute_dtype="float32"), solver=SolverConfig(refit="ls")
    )
    report = spap.prune(model, config=cfg, calibration_ids=ids)
    assert report.widths == [32] * 3  # 48 - round(0.3 * 48) = 34 -> nearest multiple of 8
    out = spap.save_pruned(model, tmp_path / "rounded")
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert AutoModelForCausalLM.from_pretrained(out).config.intermediate_size == 32


def test_wide_mlps_are_rounded_to_multiples_of_64_by_default():
    """The default multiple: 64 where every MLP is >= 1024 wide (llama.cpp and GPUs run odd widths
    slower than dense), --target-ratio included; exact below that; an explicit multiple wins."""
    from transformers import LlamaConfig

    from spap.config import AUTO_WIDTH_MULTIPLE

    assert PruneConfig().width_multiple_for([1536] * 30) == AUTO_WIDTH_MULTIPLE == 64
    assert PruneConfig().width_multiple_for([1536, 512]) == 1
    assert PruneConfig(target_ratio=0.2).width_multiple_for([1536]) == 64
    assert PruneConfig(target_ratio=0.2).width_multiple_for([512]) == 1
    assert PruneConfig(width_multiple=1).width_multiple_for([1536]) == 1
    assert PruneConfig(width_multiple=256, target_ratio=0.2).width_multiple_for([1536]) == 256
    with pytest.raises(ValueError, match="width_multiple must be an integer >= 1"):
        PruneConfig(width_multiple=0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=2
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    cfg = PruneConfig(sparsity=0.3, runtime=RuntimeConfig(compute_dtype="float32"), solver=SolverConfig(refit="ls"))
    report = spap.prune(model, config=cfg, calibration_ids=torch.randint(0, 64, (2, 16)))
    assert report.widths == [1088]  # 1536 - round(0.3 * 1536) = 1075 -> nearest multiple of 64


def test_width_multiple_under_global_allocation_keeps_the_budget():
    model, ids = tiny_model("llama"), tiny_ids(n=8, seq_len=32)
    cfg = PruneConfig(
        sparsity=0.3,
        allocation="structprune",
        width_multiple=8,
        runtime=RuntimeConfig(compute_dtype="float32"),
        max_sparsity=0.8,
        solver=SolverConfig(refit="ls"),
    )
    report = spap.prune(model, config=cfg, calibration_ids=ids)
    assert all(w % 8 == 0 for w in report.widths)
    assert abs(sum(48 - w for w in report.widths) - round(0.3 * 48 * 3)) <= 4
