"""Depth pruning: removing decoder layers computes what the dense model computes with those layers
skipped, writes a stock checkpoint (fewer ``num_hidden_layers``, per-layer attention kinds kept),
and removes the layers that change the hidden state least."""

from __future__ import annotations

import json
from dataclasses import replace

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


def _dense_pieces(model, ids):
    """Layer 0's MLP activations z (n, m) and output y (n, d), layer 0's output h and layer 1's output
    R(h) (n, d) on ``ids``, from the dense model."""
    captured = []
    down = model.model.layers[0].mlp.down_proj
    hook = down.register_forward_hook(lambda _m, args, out: captured.extend((args[0], out)))
    try:
        with torch.no_grad():
            states = model(ids, output_hidden_states=True).hidden_states
    finally:
        hook.remove()
    z, y = (t.reshape(-1, t.shape[-1]).double() for t in captured)
    return z, y, states[1].reshape(z.shape[0], -1).double(), states[2].reshape(z.shape[0], -1).double()


def test_the_layer_before_a_removed_one_is_refit_to_what_it_added():
    """Repair against brute force: with layer 1 removed and no width pruned, layer 0's W_down is the least
    squares fit of z -> y + (R(h) - h) over the calibration tokens, and layer 0's output moves closer to
    the dense model's after layer 1 than without the repair."""
    ids = tiny_ids(4, 24)
    z, y, h, after = _dense_pieces(tiny_model("llama"), ids)
    solution = torch.linalg.lstsq(z, y + after - h).solution.T
    cfg = spap.PruneConfig(
        sparsity=0.0,
        drop_layers=1,
        solver=spap.SolverConfig(damping=1e-9),
        runtime=spap.RuntimeConfig(compute_dtype="float32", device="cpu"),
    )
    outputs = {}
    for repair in (True, False):
        model = tiny_model("llama")
        report = spap.prune(model, config=replace(cfg, depth_repair=repair), calibration_ids=ids, dropped_layers=[1])
        assert model.config.num_hidden_layers == 2 and report.extra["depth"]["dropped"] == [1]
        with torch.no_grad():
            outputs[repair] = model(ids, output_hidden_states=True).hidden_states[1].reshape(h.shape).double()
        if repair:
            assert report.extra["depth"]["repaired_after"] == {"0": [1]}
            torch.testing.assert_close(
                model.model.layers[0].mlp.down_proj.weight.double(), solution, rtol=1e-3, atol=1e-3
            )
    assert (outputs[True] - after).norm() < 0.9 * (outputs[False] - after).norm()
    torch.testing.assert_close(outputs[False], h, rtol=1e-5, atol=1e-5)  # without repair layer 0 is unchanged


def test_repair_is_skipped_where_the_mlp_output_is_normalised_and_before_the_first_kept_layer():
    ids = tiny_ids(2, 16)
    cfg = spap.PruneConfig(
        sparsity=0.0, drop_layers=1, runtime=spap.RuntimeConfig(compute_dtype="float32", device="cpu")
    )
    gemma = tiny_model("gemma2")  # out = h + post_feedforward_layernorm(mlp(h)): no linear target
    report = spap.prune(gemma, config=cfg, calibration_ids=ids, dropped_layers=[1])
    assert report.extra["depth"]["repair"] == "the MLP output is not added last in this family"
    llama, reference = tiny_model("llama"), _skipping(tiny_model("llama"), {0})
    report = spap.prune(llama, config=cfg, calibration_ids=ids, dropped_layers=[0])
    assert report.extra["depth"]["unrepaired"] == [0] and report.extra["depth"]["repaired_after"] == {}
    with torch.no_grad():  # nothing before layer 0 to refit: the model is the dense one without it
        torch.testing.assert_close(llama(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_configs_written_before_the_repair_existed_load_without_it():
    old = spap.PruneConfig(drop_layers=2).to_dict()
    old["version"] = 3
    del old["depth_repair"]
    assert spap.PruneConfig.from_dict(old).depth_repair is False
    assert spap.PruneConfig.from_json(spap.PruneConfig(drop_layers=2).to_json()).depth_repair is True
