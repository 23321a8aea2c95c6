import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import spap
from spap.adapters import get_adapter
from spap.config import PruneConfig, RuntimeConfig
from spap.core import SolverConfig
from spap.core.heads import column_groups

from ..conftest import tiny_ids, tiny_model
from .test_pipeline import logits


def head_config(target: str, head_sparsity: float, sparsity: float = 0.25, head_unit: str = "kv-group") -> PruneConfig:
    return PruneConfig(
        sparsity=sparsity,
        target=target,
        head_sparsity=head_sparsity,
        head_unit=head_unit,
        runtime=RuntimeConfig(compute_dtype="float32"),
        solver=SolverConfig(refit="ls"),
    )


def test_column_groups_follow_gqa_sharing():
    groups = column_groups(n_heads=6, n_kv_heads=2, head_dim=4)
    assert groups.tolist() == [0] * 12 + [1] * 12
    with pytest.raises(ValueError):
        column_groups(6, 4, 4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gemma3_text", "opt"])
def test_head_groups_removed_consistently_and_reload(family, tmp_path):
    model, ids = tiny_model(family), tiny_ids()
    adapter = get_adapter(model)
    n_heads, n_kv, head_dim = adapter.attention_shape(adapter.decoder_layers(model)[0])
    report = spap.prune(model, config=head_config("both", 0.5), calibration_ids=ids)
    for layer, rep in zip(adapter.decoder_layers(model), report.layers):
        h, kv, hd = adapter.attention_shape(layer)
        assert kv == n_kv - round(0.5 * n_kv) and h == kv * (n_heads // n_kv) and hd == head_dim
        proj = adapter.attention_projections(layer)
        assert proj["q"].out_features == h * hd == proj["o"].in_features
        assert proj["k"].out_features == kv * hd == proj["v"].out_features
        assert h % kv == 0  # still a valid GQA layer
        assert len(rep.kv_groups_kept) == kv and rep.heads_error is not None
    expected = logits(model, ids)
    out = spap.save_pruned(model, tmp_path / "heads")
    torch.testing.assert_close(logits(spap.load_pretrained(out), ids), expected, rtol=0, atol=0)
    if family != "opt":  # uniform GQA head counts are expressible in the stock config
        reloaded = AutoModelForCausalLM.from_pretrained(out)
        assert torch.equal(logits(reloaded, ids), expected)
        config = json.loads((out / "config.json").read_text())
        assert config["num_key_value_heads"] == n_kv // 2 and config["head_dim"] == head_dim
        assert "auto_map" not in config
    else:  # OPTConfig cannot describe narrower attention: spap's class via trust_remote_code
        reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        assert torch.equal(logits(reloaded, ids), expected)


def test_invalid_stock_head_count_falls_back_to_shape_aware_loader(tmp_path):
    """hidden_size % num_attention_heads != 0 after pruning: LlamaConfig rejects it, spap's class loads it."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
        max_position_embeddings=64,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = tiny_ids()
    spap.prune(model, config=head_config("attn", 0.25), calibration_ids=ids)  # 4 -> 3 heads; 32 % 3 != 0
    out = spap.save_pruned(model, tmp_path / "odd")
    saved = json.loads((out / "config.json").read_text())
    assert saved["num_attention_heads"] == 4 and "auto_map" in saved
    assert torch.equal(logits(spap.load_pretrained(out), ids), logits(model, ids))


def test_attention_only_target_leaves_mlp_alone():
    model, ids = tiny_model("llama"), tiny_ids()
    report = spap.prune(model, config=head_config("attn", 0.5), calibration_ids=ids)
    assert report.widths == [48, 48, 48]
    assert all(len(r.kv_groups_kept) == 1 for r in report.layers)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2", "gemma3_text"])
def test_query_heads_removed_in_every_kv_group_and_stock_reload(family, tmp_path):
    model, ids = tiny_model(family), tiny_ids()
    adapter = get_adapter(model)
    n_heads, n_kv, head_dim = adapter.attention_shape(adapter.decoder_layers(model)[0])
    per_group = n_heads // n_kv
    kv_weights = [adapter.attention_projections(layer)["k"].weight.clone() for layer in adapter.decoder_layers(model)]
    report = spap.prune(model, config=head_config("both", 0.5, head_unit="query"), calibration_ids=ids)
    left = per_group - round(0.5 * per_group)
    for layer, rep, k_before in zip(adapter.decoder_layers(model), report.layers, kv_weights):
        assert adapter.attention_shape(layer) == (n_kv * left, n_kv, head_dim)
        assert torch.equal(adapter.attention_projections(layer)["k"].weight, k_before)  # KV heads untouched
        assert [sum(h // per_group == g for h in rep.query_heads_kept) for g in range(n_kv)] == [left] * n_kv
        assert rep.kv_groups_kept is None and rep.heads_error is not None
        assert adapter.attention_module(layer).num_key_value_groups == left
    expected = logits(model, ids)
    out = spap.save_pruned(model, tmp_path / "query-heads")
    config = json.loads((out / "config.json").read_text())
    assert config["num_attention_heads"] == n_kv * left and config["num_key_value_heads"] == n_kv
    assert "auto_map" not in config  # stock-loadable: no remote code needed
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), ids), expected)


def test_query_heads_the_stock_config_rejects_load_with_their_group_size(tmp_path):
    """9 -> 6 query heads with hidden_size 27: LlamaConfig rejects 27 % 6, so num_key_value_groups
    travels as a module attribute and spap's loader restores it."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=27,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=8,
        max_position_embeddings=64,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = tiny_ids()
    spap.prune(model, config=head_config("attn", 1 / 3, head_unit="query"), calibration_ids=ids)
    out = spap.save_pruned(model, tmp_path / "odd-query")
    saved = json.loads((out / "config.json").read_text())
    assert saved["num_attention_heads"] == 9 and "auto_map" in saved
    assert all(v == {"num_key_value_groups": 2} for v in saved["spap_module_attributes"].values())
    expected = logits(model, ids)
    assert torch.equal(logits(spap.load_pretrained(out), ids), expected)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True), ids), expected)
    again = spap.save_pruned(spap.load_pretrained(out), tmp_path / "saved-again")  # read back from the modules
    assert json.loads((again / "config.json").read_text())["spap_module_attributes"] == saved["spap_module_attributes"]
    assert torch.equal(logits(spap.load_pretrained(again), ids), expected)


def test_query_head_unit_refuses_models_and_fractions_it_cannot_serve():
    ids = tiny_ids()
    with pytest.raises(ValueError, match="one query head per KV head"):  # OPT: multi-head attention
        spap.prune(tiny_model("opt"), config=head_config("attn", 0.5, head_unit="query"), calibration_ids=ids)
    with pytest.raises(ValueError, match="removes 0 of the 2"):  # llama: 2 query heads per KV group
        spap.prune(tiny_model("llama"), config=head_config("attn", 0.2, head_unit="query"), calibration_ids=ids)
    with pytest.raises(ValueError, match="unknown head_unit"):
        head_config("attn", 0.5, head_unit="heads")
