"""Depth pruning: removing decoder layers computes what the dense model computes with those layers
skipped, writes a stock checkpoint (fewer ``num_hidden_layers``, per-layer attention kinds kept),
and removes the layers that change the hidden state least."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import spap
from spap.adapters import get_adapter
from spap.pruning.depth import least_changing_layers

from ..conftest import tiny_ids, tiny_model


def _skipping(model, skipped: set[int]):
    """``model`` with the decoder layers ``skipped`` passing their input through unchanged."""
    layers = get_adapter(model).decoder_layers(model)
    for index in skipped:
        layers[index].forward = lambda *args, **kwargs: args[0] if args else kwargs["hidden_states"]
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2_sliding", "gemma2", "gemma3_text", "opt", "mistral"])
def test_removed_layers_are_skipped_layers_and_reload_stock(family, tmp_path):
    ids = tiny_ids(2, 20)
    model = tiny_model(family)
    reference = _skipping(tiny_model(family), {1})
    get_adapter(model).remove_layers(model, [1])
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    spap.save_pruned(model, tmp_path / "out")
    assert not (tmp_path / "out" / "modeling_spap.py").exists()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
    prompt = ids[:1, :5]
    generated = model.generate(prompt, max_new_tokens=4, do_sample=False)  # the KV cache indexes the kept layers
    assert torch.equal(generated, reloaded.generate(prompt, max_new_tokens=4, do_sample=False))


def test_kept_layers_keep_their_attention_kind():
    model = tiny_model("gemma2")  # layers alternate sliding and full attention
    kinds = list(model.config.layer_types)
    get_adapter(model).remove_layers(model, [0])
    assert model.config.layer_types == kinds[1:]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]


def test_the_least_changing_layers_are_chosen():
    assert least_changing_layers([0.3, 0.1, 0.2, 0.1], 2) == [1, 3]
    assert least_changing_layers([0.3, 0.1], 0) == []
    with pytest.raises(ValueError, match="drop_layers must be in"):
        least_changing_layers([0.3, 0.1], 2)


def test_prune_removes_the_layers_of_least_angular_change_then_prunes_width(tmp_path):
    from spap.pruning.probe import probe_layers
    from spap.runtime.device import resolve_device

    ids = tiny_ids(4, 24)
    model = tiny_model("llama")
    cfg = spap.PruneConfig(
        sparsity=0.25, drop_layers=1, runtime=spap.RuntimeConfig(compute_dtype="float32", device="cpu")
    )
    angular = [
        p.angular for p in probe_layers(model, get_adapter(model), ids, cfg, resolve_device("cpu"), torch.float32)
    ]
    report = spap.prune(model, config=cfg, calibration_ids=ids)
    depth = report.extra["depth"]
    assert depth["dropped"] == [min(range(3), key=angular.__getitem__)]
    assert depth["angular_distances"] == pytest.approx(angular)
    assert model.config.num_hidden_layers == 2 and len(report.layers) == 2
    assert all(layer.width_after == 36 for layer in report.layers)
    assert report.parameters_after < report.parameters_before


def test_the_cli_removes_layers_into_a_stock_checkpoint(tiny_checkpoint, tmp_path, capsys):
    from spap.cli import main

    from ..cli.test_cli_failures import _nothing_left, _one_error_line

    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    args = ["prune", str(tiny_checkpoint), "--sparsity", "0", "--drop-layers", "2", "--calib", str(calib)]
    args += ["--n-samples", "4", "--seq-len", "32"]
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == 0
    record = json.loads((out / "pruning.json").read_text())
    assert len(record["extra"]["depth"]["dropped"]) == 2 and record["config"]["drop_layers"] == 2
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1
    refused = tmp_path / "refused"
    assert main([*args, "--out", str(refused), "--drop-layers", "3"]) == 2
    assert "--drop-layers 3 must be less than the model's 3 decoder layers" in _one_error_line(capsys.readouterr().err)
    assert main([*args, "--out", str(refused), "--offload", "always"]) == 2
    assert "--drop-layers does not work with out-of-core pruning" in _one_error_line(capsys.readouterr().err)
    assert _nothing_left(refused)


def test_removing_no_layers_changes_nothing():
    model, ids = tiny_model("gemma2"), tiny_ids(2, 16)
    with torch.no_grad():
        before = model(ids).logits
        get_adapter(model).remove_layers(model, [])
        assert torch.equal(model(ids).logits, before)
    assert model.config.num_hidden_layers == 3
