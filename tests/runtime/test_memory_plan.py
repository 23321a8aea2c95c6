"""The memory model: an upper bound of what ``spap prune`` takes on a real run, depth-free when
streamed, and ``spap prune --dry-run`` prints it without loading or writing anything."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from spap.cli import main
from spap.config import CalibrationConfig, PruneConfig, RuntimeConfig
from spap.core import SolverConfig
from spap.core.stats import CHUNK_TOKENS
from spap.runtime.device_memory import solver_matrices
from spap.runtime.memory import RUNTIME_GIB, predict_peak, predict_peak_of_shapes, shard_bytes

from ..conftest import tiny_tokenizer


def _checkpoint(directory, layers: int, intermediate: int = 64):
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def _cfg(**solver) -> PruneConfig:
    return PruneConfig(
        calibration=CalibrationConfig(n_samples=4, seq_len=32),
        solver=SolverConfig(**solver),
        runtime=RuntimeConfig(compute_dtype="float32", device="cpu"),
    )


def test_streamed_prediction_does_not_grow_with_depth_and_in_memory_does(tmp_path):
    shallow, deep = _checkpoint(tmp_path / "two", 2), _checkpoint(tmp_path / "eight", 8)
    cfg = _cfg()
    cfg.runtime.max_host_memory_gib = 1.0
    two, eight = (predict_peak(path, cfg, streamed=True).prune for path in (shallow, deep))
    assert {k: v for k, v in two.items() if k != "output shard"} == {
        k: v for k, v in eight.items() if k != "output shard"
    }
    assert eight["output shard"] <= shard_bytes(1.0) / 2**30  # the writer's buffer: one shard at most
    assert predict_peak(deep, cfg, streamed=False).peak_gib > predict_peak(shallow, cfg, streamed=False).peak_gib


def test_the_solve_term_is_the_methods(tmp_path):
    path = _checkpoint(tmp_path / "wide", 2, intermediate=4096)  # m x m float64 matrices dominate
    least_squares = predict_peak(path, _cfg(method="spap-ls"), streamed=True).prune["solve or statistics"]
    scores_only = predict_peak(path, _cfg(method="wanda-sp"), streamed=True).prune["solve or statistics"]
    assert least_squares > solver_matrices(0.3, "penalty") * 8 * 4096**2 / 2**30
    tokens = min(CHUNK_TOKENS, 4 * 32)  # one chunk of statistics: at most the batch's 4 x 32 tokens
    forward = 3 * 4 * 32 * 4096 * 4  # the batch's gate, up and product in the layer forward (float32)
    assert scores_only == (4 * tokens * (32 + 4096) + forward) / 2**30  # no m x m matrix: statistics


def test_the_prediction_bounds_a_real_run_from_above(tmp_path, tiny_checkpoint):
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "out"
    argv = ["prune", str(tiny_checkpoint), "--out", str(out), "--calib", str(calib)]
    argv += ["--n-samples", "4", "--seq-len", "32", "--compute-dtype", "float32"]
    # VmHWM: this process image's own peak (ru_maxrss would also count pytest's RSS at the exec)
    peak = "open('/proc/self/status').read().split('VmHWM:')[1].split()[0]"
    code = f"from spap.cli import main; assert main({argv!r}) == 0; print({peak})"
    peak_gib = (
        int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()[-1])
        / 2**20
    )
    recorded = json.loads((out / "pruning.json").read_text())["predicted_peak_rss_gib"]
    print(f"tiny run: measured {peak_gib:.3f} GiB, predicted {recorded:.3f}")
    assert peak_gib <= recorded, (peak_gib, recorded)
    assert recorded < RUNTIME_GIB + 0.1  # a tiny model: the process's own cost


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(tiny_checkpoint), "--dry-run", "--out", str(out), "--seq-len", "32"]) == 0
    line = capsys.readouterr().out
    assert "in memory; predicted peak host memory" in line and f"runtime {RUNTIME_GIB:.2f}" in line, line
    assert not out.exists()
    assert main(["prune", str(tiny_checkpoint), "--dry-run", "--offload", "always", "--seq-len", "32"]) == 0
    assert "streamed one decoder layer at a time; predicted peak host memory" in capsys.readouterr().out


def test_streamed_peak_is_the_same_for_8_and_32_layers_of_one_width():
    """The output buffer is two layers at most, so past a few layers depth adds nothing."""
    from spap.runtime.memory import predict_peak_of_shapes

    def shapes(layers: int) -> dict[str, tuple[int, ...]]:
        d, m = 1024, 4096
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (49152, d), "model.norm.weight": (d,)}
        for i in range(layers):
            for name, shape in {"q_proj": (d, d), "k_proj": (256, d), "v_proj": (256, d), "o_proj": (d, d)}.items():
                out[f"model.layers.{i}.self_attn.{name}.weight"] = shape
            for name, shape in {"gate_proj": (m, d), "up_proj": (m, d), "down_proj": (d, m)}.items():
                out[f"model.layers.{i}.mlp.{name}.weight"] = shape
        return out

    cfg = _cfg()
    eight, thirty_two = (predict_peak_of_shapes(shapes(n), 1024, 4096, cfg, streamed=True) for n in (8, 32))
    assert eight.peak_gib == thirty_two.peak_gib
    assert eight.prune["output shard"] == 2**26 / 2**30  # 2 x a 30 MB bf16 layer is under the 64 MiB floor


def test_float32_solve_halves_the_solver_state():
    path_cfg = dict(method="spap-ls")
    shapes = {"model.layers.0.mlp.up_proj.weight": (4096, 1024)}
    f64, f32 = (
        predict_peak_of_shapes(shapes, 1024, 4096, _cfg(**path_cfg, solve_dtype=d), streamed=True)
        for d in ("auto", "float32")
    )
    assert f32.prune["solve or statistics"] == f64.prune["solve or statistics"] / 2


def test_a_budget_that_float64_exceeds_resolves_auto_to_float32(tmp_path):
    path = _checkpoint(tmp_path / "m", layers=2, intermediate=2048)
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    f64, f32 = (predict_peak(path, _cfg(solve_dtype=d), streamed=False).peak_gib for d in ("auto", "float32"))
    assert f32 < f64
    for budget, expected in (((f64 + f32) / 2, "float32"), (f64 + 0.01, "auto")):
        out = tmp_path / f"out-{expected}"
        argv = ["prune", str(path), "--out", str(out), "--calib", str(calib), "--n-samples", "4", "--seq-len", "32"]
        argv += ["--offload", "never", "--max-host-memory", str(budget), "--compute-dtype", "float32"]
        assert main(argv) == 0
        assert json.loads((out / "pruning.json").read_text())["config"]["solver"]["solve_dtype"] == expected


def test_a_search_counts_the_pruned_copy_of_the_model(tmp_path):
    path = _checkpoint(tmp_path / "m", layers=2)
    plain = predict_peak(path, _cfg(), streamed=False).prune
    searched = predict_peak(path, replace(_cfg(), allocation="search"), streamed=False).prune
    budgeted = predict_peak(path, replace(_cfg(), target_ratio=0.2), streamed=False).prune
    extra = searched.pop("search: a pruned copy and its logits")
    assert searched == plain and extra > plain["float32 weights"]
    assert budgeted["search: a pruned copy and its logits"] == extra


def test_a_float32_checkpoint_is_used_in_place_and_its_pages_stay_mapped(tmp_path):
    """transformers loads float32 tensors from the mapped files without a copy: loading adds no file
    pages beside the model, and the pruned layers' new weights add up while the old pages stay."""
    path = _checkpoint(tmp_path / "m", layers=2)  # saved in float32
    cfg = replace(_cfg(), sparsity=0.25)
    plan = predict_peak(path, cfg, streamed=False)
    files = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30
    assert plan.load["checkpoint files mapped"] == pytest.approx(0, abs=1e-4)  # headers only
    assert plan.load["float32 weights"] == plan.prune["float32 weights"] == pytest.approx(files, rel=0.05)
    new_mlps = 4 * 0.75 * 3 * 32 * 64 * 2 / 2**30  # the kept neurons' up, gate and down of both layers
    assert plan.prune["pruned layers' new weights (old pages stay mapped)"] == pytest.approx(new_mlps)
    assert plan.save["float32 weights (mapped)"] == plan.load["float32 weights"]
    assert plan.save["a copy to save"] > 0  # bfloat16 written
    assert predict_peak(path, cfg, streamed=False, save_bytes=4).save["a copy to save"] == 0


def test_a_bfloat16_checkpoint_is_converted_beside_its_mapped_files(tmp_path):
    path = _checkpoint(tmp_path / "m", layers=2)
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(path)
    plan = predict_peak(path, _cfg(), streamed=False)
    files = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30
    assert plan.load["checkpoint files mapped"] == files
    assert plan.load["float32 weights"] == pytest.approx(2 * files, rel=0.05)  # headers aside
    assert "a layer's new weights" in plan.prune and "pruned float32 weights" in plan.save
    assert plan.peak_gib >= sum(plan.load.values())
    assert not predict_peak(path, _cfg(), streamed=True).load  # streamed runs never load the whole model


def test_a_few_float32_tensors_in_a_bfloat16_checkpoint_barely_move_the_plan():
    """Mapping is per tensor: a bfloat16 checkpoint holding its norms in float32 is planned as the
    converted model it nearly is, not as a mapped one."""
    shapes = {"model.embed_tokens.weight": (128, 32), "model.norm.weight": (32,)}
    for i in range(2):
        for name, shape in {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "o_proj": (32, 32)}.items():
            shapes[f"model.layers.{i}.self_attn.{name}.weight"] = shape
        for name, shape in {"gate_proj": (64, 32), "up_proj": (64, 32), "down_proj": (32, 64)}.items():
            shapes[f"model.layers.{i}.mlp.{name}.weight"] = shape
    cfg = replace(_cfg(), sparsity=0.25)
    converted = predict_peak_of_shapes(shapes, 32, 64, cfg, streamed=False)
    mixed = predict_peak_of_shapes(shapes, 32, 64, cfg, streamed=False, mapped_elements=32)  # the final norm
    assert mixed.prune["a layer's new weights"] == pytest.approx(converted.prune["a layer's new weights"], rel=0.01)
    assert mixed.save["pruned float32 weights"] == pytest.approx(converted.save["pruned float32 weights"], rel=0.01)
    assert mixed.peak_gib == pytest.approx(converted.peak_gib, rel=0.01)
