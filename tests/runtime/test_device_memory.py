"""The device-memory plan bounds what a layer-at-a-time run allocates, phase by phase, measured with
``TensorMeter`` on the CPU (the tensors a GPU run would hold), and the meter counts what it should."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import spap
from spap.config import CalibrationConfig, PruneConfig, RuntimeConfig
from spap.core import SolverConfig
from spap.runtime.device_memory import KERNEL_COPY, kept_on_host, predict_device_peak, solver_matrices
from spap.runtime.memory import MemoryPlan, elements_per_layer, predict_peak_of_shapes
from spap.runtime.tensor_meter import TensorMeter, metering

KIB = 1024


def test_the_meter_counts_new_storages_until_their_last_view_dies():
    base = torch.ones(1000)  # before the meter: never counted
    with TensorMeter() as meter:
        a = torch.zeros(256 * KIB, dtype=torch.uint8)
        b = torch.empty(512 * KIB, dtype=torch.uint8)
        assert (meter.live, meter.peak) == (768 * KIB, 768 * KIB)
        view = b[:10]
        b.add_(1)  # in place: nothing new
        base.mul_(2)
        del b  # the view keeps the storage alive
        assert meter.live == 768 * KIB
        del view
        assert meter.live == 256 * KIB
        with meter.phase("double"):
            c = a.double()  # a copy, 8 bytes per element
            assert meter.live == 256 * KIB * 9
            del c
        assert meter.phases["double"] == 256 * KIB * 9
        del a
        assert (meter.live, meter.peak) == (0, 256 * KIB * 9)


def test_solver_matrices_follow_the_penalty_loops_support():
    assert solver_matrices(0.3, "penalty") == 3.0  # the factorisation's three matrices dominate
    assert solver_matrices(0.5, "penalty") == pytest.approx(3.25)  # G, B^-1, two p x m and p x p
    assert solver_matrices(0.9, "score") == 3.0


def _model(hidden: int, intermediate: int, stored: torch.dtype):
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=1,  # the pruned layers' new weights, host memory on a GPU run, would add up
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=stored).eval()


CASES = [  # hidden, MLP width, sparsity, method, compute dtype
    (64, 512, 0.3, "spap-ls", "float32"),
    (64, 512, 0.6, "spap-ls", "float32"),  # the penalty loop's rounds hold more than the factorisation
    (32, 384, 0.3, "spap", "float32"),  # the alternating refit's token rows and second statistics pass
    (64, 256, 0.3, "spap-ls", "bfloat16"),  # copies in the compute dtype, float32 chunks
    (64, 512, 0.3, "wanda-sp", "float32"),  # scores only: no m x m matrices
]


@pytest.mark.parametrize(("hidden", "width", "sparsity", "method", "dtype"), CASES)
def test_the_device_plan_bounds_each_phase_of_a_metered_run(hidden, width, sparsity, method, dtype):
    model = _model(hidden, width, torch.bfloat16)  # stored in bfloat16: the layer and MLP copies are real
    cfg = PruneConfig(
        sparsity=sparsity,
        calibration=CalibrationConfig(n_samples=4, seq_len=64),
        solver=SolverConfig(method=method, refit_tokens=128, refit_holdout_tokens=64),
        runtime=RuntimeConfig(device="cpu", compute_dtype=dtype, batch_size=4),  # one batch: what the host keeps
    )
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    layer = max(elements_per_layer(shapes).values())
    plan = predict_device_peak(hidden, width, layer, 0, cfg, getattr(torch, dtype))
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    with metering():
        report = spap.prune(model, config=cfg, calibration_ids=ids)
    measured: dict[str, float] = {}
    for done in report.layers:
        for phase, gib in done.gpu_peak_gib.items():
            measured[phase] = max(measured.get(phase, 0.0), gib)
    assert {"statistics", "solve", "propagate"} <= measured.keys()
    # what the CPU keeps in place that a GPU run moves to the host
    on_host = kept_on_host(cfg, hidden, report.widths[0], hidden // 4, getattr(torch, dtype), torch.bfloat16)
    measured = {phase: gib - on_host.get(phase, 0.0) for phase, gib in measured.items()}
    pairs = {"statistics": "statistics", "solve": "solving", "final_ls": "solving", "propagate": "propagating"}
    for phase, gib in measured.items():  # the meter cannot see what CUDA kernels allocate inside an op
        predicted = plan.tensor_gib(pairs[phase])
        assert gib <= predicted, (phase, gib, plan.phases[pairs[phase]])
    # tight where the solve dominates: the m x m terms are counted, not padded
    if method != "wanda-sp":
        assert measured["solve"] >= 0.75 * plan.tensor_gib("solving")


def test_the_plan_line_names_the_gpu_peak_when_there_is_one():
    plan = predict_device_peak(4096, 14336, 218_112_000, 2 * 128256 * 4096, PruneConfig(), torch.bfloat16)
    line = MemoryPlan(False, save={}, prune={"float32 weights": 30.0}, device=plan).line()
    assert line.startswith("predicted peak host memory 30.0 GiB")
    assert "; predicted peak GPU memory " in line and "(while solving: " in line
    # LLaMA-3.1-8B shapes, 128 x 2048 tokens, bfloat16: the solve's three 14,336^2 float64 matrices lead
    assert 5.5 < plan.phase_gib("solving") == plan.peak_gib < 9
    assert plan.phases["solving"][KERNEL_COPY] == 8 * 14336**2 / 2**30  # one float64 m x m on CUDA


def _plans(cfg: PruneConfig) -> MemoryPlan:
    """A plan with the device phases of LLaMA-3-70B's MLP shapes (the host part small)."""
    device = predict_device_peak(8192, 28672, 855_654_400, 0, cfg, torch.bfloat16)
    return MemoryPlan(False, save={}, prune={"float32 weights": 1.0}, device=device)


@pytest.mark.parametrize(("gpu_gib", "expected"), [(20.0, "float32"), (80.0, "auto"), (None, "auto")])
def test_auto_solves_in_float32_when_the_float64_plan_exceeds_the_gpu(monkeypatch, caplog, gpu_gib, expected):
    from spap import api
    from spap.runtime import device, memory

    monkeypatch.setattr(device, "gpu_memory_gib", lambda _name: gpu_gib)
    monkeypatch.setattr(memory, "predict_peak", lambda _src, cfg, _streamed, _save: _plans(cfg))
    caplog.set_level(logging.INFO, logger="spap")
    cfg = PruneConfig()
    plan = api._fit_solve_dtype("model", cfg, False, 2, _plans(cfg))
    assert cfg.solver.solve_dtype == expected
    assert plan.device is not None and plan.device.peak_gib == _plans(cfg).device.peak_gib  # the resolved dtype's
    if expected == "float32":
        float64 = _plans(PruneConfig()).device
        assert float64 is not None and plan.device.peak_gib < gpu_gib < float64.peak_gib
        assert "exceeds the GPU's memory" in caplog.text


def test_a_cuda_run_plans_the_device_and_a_cpu_run_does_not():
    shapes = {
        "model.embed_tokens.weight": (1000, 256),
        "model.layers.0.self_attn.q_proj.weight": (256, 256),
        "model.layers.0.mlp.up_proj.weight": (1024, 256),
        "model.layers.0.mlp.gate_proj.weight": (1024, 256),
        "model.layers.0.mlp.down_proj.weight": (256, 1024),
    }
    assert (
        predict_peak_of_shapes(shapes, 256, 1024, PruneConfig(runtime=RuntimeConfig(device="cpu")), False).device
        is None
    )
    # planned without a GPU here: the plan of the run that --device cuda would be
    plan = predict_peak_of_shapes(shapes, 256, 1024, PruneConfig(runtime=RuntimeConfig(device="cuda")), False)
    assert plan.device is not None
    layer = 256 * 256 + 3 * 256 * 1024
    expected = predict_device_peak(256, 1024, layer, 1000 * 256, PruneConfig(), torch.bfloat16, outside_bytes=4)
    assert plan.device.phases == expected.phases  # 2-byte compute on CUDA; the float32 weights outside
    assert "predicted peak GPU memory" in plan.line()


def test_dry_run_plans_a_gpu_run_on_a_machine_without_one(tiny_checkpoint, capsys):
    from spap.cli import main

    argv = ["prune", str(tiny_checkpoint), "--dry-run", "--seq-len", "64"]
    assert main([*argv, "--device", "cuda"]) == 0
    line = capsys.readouterr().out
    assert "predicted peak host memory" in line and "; predicted peak GPU memory " in line
    assert main([*argv, "--device", "cpu"]) == 0
    assert "GPU" not in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_run_on_a_missing_gpu_fails_in_one_line_before_work(tiny_checkpoint, tmp_path, capsys):
    from spap.cli import main

    out = tmp_path / "out"
    argv = ["prune", str(tiny_checkpoint), "--out", str(out), "--seq-len", "64", "--device", "cuda"]
    assert main(argv) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not out.exists()
