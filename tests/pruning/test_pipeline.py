import pytest
import torch

import spap
from spap.adapters import UnsupportedArchitectureError, get_adapter
from spap.config import ExperimentalConfig, PruneConfig, RuntimeConfig
from spap.core import SolverConfig

from ..conftest import tiny_config, tiny_ids, tiny_model


def fast_config(sparsity: float, **solver) -> PruneConfig:
    solver.setdefault("refit_rounds", 3)
    solver.setdefault("refit_tokens", 64)
    return PruneConfig(
        sparsity=sparsity,
        runtime=RuntimeConfig(compute_dtype="float32"),
        solver=SolverConfig(**{"method": "spap", **solver}),
    )


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_zero_sparsity_leaves_logits_unchanged(family):
    model, ids = tiny_model(family), tiny_ids()
    before = logits(model, ids)
    report = spap.prune(model, config=fast_config(0.0), calibration_ids=ids)
    assert torch.equal(logits(model, ids), before)
    assert all(layer.width_after == layer.width_before for layer in report.layers)


def test_each_layer_loses_exactly_k_neurons(family):
    model, ids = tiny_model(family), tiny_ids()
    adapter = get_adapter(model)
    widths = [adapter.mlp_width(layer) for layer in adapter.decoder_layers(model)]
    report = spap.prune(model, config=fast_config(0.25), calibration_ids=ids)
    for layer, m in zip(adapter.decoder_layers(model), widths):
        assert adapter.mlp_width(layer) == m - round(0.25 * m)
    assert report.widths == [m - round(0.25 * m) for m in widths]
    assert report.parameters_after < report.parameters_before
    assert all(0 <= layer.error < 1 for layer in report.layers)


def test_pruned_model_beats_naive_truncation():
    """SPAP's output error on the calibration data is far below keeping the first neurons."""
    model, ids = tiny_model("llama"), tiny_ids(n=8, seq_len=32)
    report = spap.prune(model, config=fast_config(0.25), calibration_ids=ids)
    naive = spap.prune(tiny_model("llama"), config=fast_config(0.25, method="magnitude"), calibration_ids=ids)
    assert sum(r.error for r in report.layers) < sum(r.error for r in naive.layers)


def test_layer_errors_are_measured_against_dense_mlp():
    model, ids = tiny_model("qwen2"), tiny_ids()
    report = spap.prune(model, config=fast_config(0.5, refit="ls"), calibration_ids=ids)
    for layer in report.layers:  # float32 compute: the measured error equals the statistics' error
        assert layer.error == pytest.approx(layer.error_ls, rel=1e-3, abs=1e-6)


def test_unknown_architecture_and_bad_sparsity_are_rejected():
    with pytest.raises(ValueError, match="sparsity"):
        PruneConfig(sparsity=1.0)
    with pytest.raises(ValueError, match="sparsity"):
        PruneConfig(sparsity=-0.1)

    class Strange(torch.nn.Module):
        config = type("C", (), {"model_type": "mamba"})()

    with pytest.raises(UnsupportedArchitectureError, match="mamba"):
        spap.prune(Strange(), config=fast_config(0.1), calibration_ids=tiny_ids())


def test_config_round_trips_through_json():
    cfg = PruneConfig(sparsity=0.4, solver=SolverConfig(method="fasp", refit_rounds=7))
    again = PruneConfig.from_json(cfg.to_json())
    assert again == cfg
    with pytest.raises(ValueError, match="unknown"):
        PruneConfig.from_dict({"sparsity": 0.2, "bogus": 1})


def test_error_correction_brings_final_hidden_states_closer_to_dense():
    ids = tiny_ids(n=8, seq_len=32)
    dense = tiny_model("llama")
    with torch.no_grad():
        target = dense(ids, output_hidden_states=True).hidden_states[-1]
    distances = {}
    for beta in (0.0, 1.0):
        model = tiny_model("llama")
        cfg = fast_config(0.4, refit="ls")
        cfg.experimental.error_correction = beta
        spap.prune(model, config=cfg, calibration_ids=ids)
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states[-1]
        distances[beta] = float((hidden - target).pow(2).sum())
    assert distances[1.0] < distances[0.0]


def test_error_correction_rejects_post_norm_opt():
    from transformers import AutoModelForCausalLM

    from ..conftest import tiny_config

    config = tiny_config("opt")
    config.do_layer_norm_before = False
    model = AutoModelForCausalLM.from_config(config).eval()
    cfg = fast_config(0.2, refit="ls")
    cfg.experimental.error_correction = 0.5
    with pytest.raises(ValueError, match="error_correction"):
        spap.prune(model, config=cfg, calibration_ids=tiny_ids())


def test_refit_on_all_tokens_never_increases_the_layer_error():
    """With the refit sample covering every calibration token, alternating minimisation starts at the
    least-squares solution and only descends (every round: no held-out rows), so the reported error after refit is <= error_ls."""
    model, ids = tiny_model("llama"), tiny_ids()
    report = spap.prune(model, config=fast_config(0.5, refit_tokens=10_000, refit_patience=0), calibration_ids=ids)
    for layer in report.layers:
        assert layer.error_refit is not None
        assert layer.error_refit <= layer.error_ls * (1 + 1e-4)
    assert any(layer.error_refit < 0.99 * layer.error_ls for layer in report.layers)


def test_unaligned_kept_widths_warn_and_rounded_ones_do_not(caplog):
    width = tiny_config("llama").intermediate_size
    sparsity = 0.3
    assert (width - round(sparsity * width)) % 8  # the exact kept width is unaligned
    with caplog.at_level("WARNING", logger="spap.pruning.pipeline"):
        spap.prune(tiny_model("llama"), config=fast_config(sparsity, refit="ls"), calibration_ids=tiny_ids())
    assert "not multiples of 8" in caplog.text
    caplog.clear()
    cfg = fast_config(sparsity, refit="ls")
    cfg.width_multiple = 8
    with caplog.at_level("WARNING", logger="spap.pruning.pipeline"):
        spap.prune(tiny_model("llama"), config=cfg, calibration_ids=tiny_ids())
    assert "not multiples" not in caplog.text


def test_residual_token_weights_are_inverse_mean_squares():
    from spap.pruning.mlp import residual_token_weights

    h = torch.tensor([[[1.0, -1.0], [30.0, 40.0]]])
    torch.testing.assert_close(residual_token_weights(h), torch.tensor([[1.0, 1 / 1250.0]]))


@pytest.mark.parametrize("refit", ["ls", "alternating"])
def test_token_weighting_prunes_and_changes_the_fit(refit):
    ids = tiny_ids(n=8, seq_len=32)
    kept, reports = {}, {}
    for weighting in ("none", "residual"):
        model = tiny_model("llama")
        cfg = fast_config(0.4, refit=refit)
        cfg.experimental.token_weighting = weighting
        reports[weighting] = spap.prune(model, config=cfg, calibration_ids=ids)
        kept[weighting] = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    assert reports["residual"].widths == reports["none"].widths
    assert reports["residual"].config["experimental"]["token_weighting"] == "residual"
    assert not torch.allclose(kept["residual"], kept["none"])
    with pytest.raises(ValueError, match="token_weighting"):
        ExperimentalConfig(token_weighting="bogus")


@pytest.mark.parametrize("family", ["opt", "gemma2"])
def test_token_weighting_rejects_models_that_normalise_the_mlp_output(family):
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)  # Gemma 2: post_feedforward_layernorm
    if family == "opt":
        config.do_layer_norm_before = False  # OPT-350m's post-norm
    model = AutoModelForCausalLM.from_config(config).eval()
    cfg = fast_config(0.2, refit="ls")
    cfg.experimental.token_weighting = "residual"
    with pytest.raises(
        ValueError, match=f"token_weighting needs layers whose MLP output is added last; {family} is not"
    ):
        spap.prune(model, config=cfg, calibration_ids=tiny_ids())


def test_refit_safeguard_keeps_the_better_of_closed_form_and_refit_per_layer():
    """A refit on 6 tokens overfits them; the safeguard then restores the closed form, so every
    layer's measured error is the smaller of error_ls and error_refit (float32, same tokens)."""
    model, ids = tiny_model("llama"), tiny_ids()
    config = fast_config(0.5, refit_tokens=6, refit_rounds=10, refit_patience=0)  # the safeguard alone
    report = spap.prune(model, config=config, calibration_ids=ids)
    assert any(layer.refit_accepted is False for layer in report.layers)
    for layer in report.layers:
        assert layer.refit_accepted == (layer.error_refit <= layer.error_ls)
        assert layer.error == pytest.approx(min(layer.error_ls, layer.error_refit), rel=1e-3, abs=1e-6)


def test_attention_replay_changes_nothing(family, monkeypatch):
    """Replaying each layer's recorded attention outputs in the passes after the first gives the same
    kept neurons and weights as computing the attention in every pass (the previous path), and the
    attention is computed in one pass per layer instead of three."""
    from contextlib import contextmanager

    from spap.runtime.layerwise import AttentionCache

    ids = tiny_ids()
    config = PruneConfig(
        sparsity=0.25,
        runtime=RuntimeConfig(compute_dtype="bfloat16"),
        solver=SolverConfig(method="spap", refit_rounds=2, refit_tokens=64, refit_patience=0),
    )

    def counted_prune() -> tuple[torch.nn.Module, spap.PruneReport, int]:
        model = tiny_model(family)
        adapter = get_adapter(model)
        attention_class = type(adapter.attention_module(adapter.decoder_layers(model)[0]))
        calls = []
        original = attention_class.forward
        monkeypatch.setattr(
            attention_class, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
        )
        report = spap.prune(model, config=config, calibration_ids=ids)
        monkeypatch.setattr(attention_class, "forward", original)
        return model, report, len(calls)

    replayed, report, replayed_calls = counted_prune()

    @contextmanager
    def compute_every_pass(self, attention, device):
        yield

    monkeypatch.setattr(AttentionCache, "use", compute_every_pass)
    recomputed, expected, recomputed_calls = counted_prune()
    assert recomputed_calls == 3 * replayed_calls  # statistics, final least squares, propagation
    assert [r.kept for r in report.layers] == [r.kept for r in expected.layers]
    assert [r.error for r in report.layers] == [r.error for r in expected.layers]
    for a, b in zip(replayed.state_dict().values(), recomputed.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["magnitude", "wanda-sp", "flap", "cfsp"])
def test_score_rules_need_only_the_gram_diagonal(method, monkeypatch):
    """Score rules accumulate diag(G) and sums only, and prune exactly as with the full statistics."""
    from dataclasses import replace

    from spap.core.solver_config import SolverConfig as Config

    ids = tiny_ids()
    config = replace(fast_config(0.25, method=method), allocation="uniform")  # every layer pruned
    assert not config.solver.needs_gram
    diagonal = tiny_model("qwen2")
    report = spap.prune(diagonal, config=config, calibration_ids=ids)
    assert all(layer.error_ls is None and layer.error > 0 for layer in report.layers)
    monkeypatch.setattr(Config, "needs_gram", property(lambda self: True))
    full = tiny_model("qwen2")
    expected = spap.prune(full, config=config, calibration_ids=ids)
    assert [r.kept for r in report.layers] == [r.kept for r in expected.layers]
    assert [r.error for r in report.layers] == pytest.approx([r.error for r in expected.layers], rel=1e-6)
    for a, b in zip(diagonal.state_dict().values(), full.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
