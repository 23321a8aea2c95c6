"""CUDA checks (skipped without a GPU; CI has none): same decisions as on CPU, layer-wise device memory."""

import pytest
import torch

import spap
from spap.evaluation.speed import compare

from ..conftest import tiny_ids, tiny_model
from .test_pipeline import fast_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("solver", [dict(refit="ls"), dict(), dict(method="flap")], ids=["ls", "alternating", "flap"])
def test_cuda_pruning_keeps_the_same_neurons_as_cpu(solver):
    ids = tiny_ids(n=8, seq_len=32)
    cpu_model, gpu_model = tiny_model("llama"), tiny_model("llama")
    cfg = fast_config(0.25, **solver)
    cfg.runtime.device = "cpu"
    cpu = spap.prune(cpu_model, config=cfg, calibration_ids=ids)
    cfg.runtime.device = "cuda"  # no index: must compare equal to the tensors' "cuda:0"
    gpu = spap.prune(gpu_model, config=cfg, calibration_ids=ids)
    if solver.get("refit") == "ls":  # gradient refits differ in rounding, so only the exact path is compared
        assert [layer.kept for layer in gpu.layers] == [layer.kept for layer in cpu.layers]
    devices = {p.device.type for p in gpu_model.parameters()} | {b.device.type for b in gpu_model.buffers()}
    assert devices == {"cpu"}  # weights return to the host layer by layer, tied embeddings included
    assert "peak_gpu_gib" in gpu.memory


def test_cuda_speed_comparison_runs_with_graphs():
    dense = tiny_model("llama").to("cuda", torch.bfloat16)
    pruned = tiny_model("llama")
    spap.prune(pruned, config=fast_config(0.5, refit="ls"), calibration_ids=tiny_ids())
    result = compare(
        dense, pruned.to("cuda", torch.bfloat16), prefill_batch=2, prefill_len=32, decode_batch=2, new_tokens=8
    )
    assert result["byte_ratio_limit"] > 1
    assert result["dense"]["peak_gpu_gib"] is not None


def test_self_generation_runs_on_the_gpu_and_returns_the_model_to_the_host():
    from spap.io.calibration import self_generated

    from ..conftest import tiny_tokenizer

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    ids = self_generated(model, tokenizer, 3, 12, seed=0, batch_size=2, device=torch.device("cuda"))
    assert ids.shape == (3, 12) and ids.device.type == "cpu"
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_phase_peaks_measure_each_block_and_keep_the_run_peak():
    from spap.runtime.device import peak_memory, phase_peak, reset_peak_memory

    device = torch.device("cuda", torch.cuda.current_device())
    reset_peak_memory(device)
    big = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)  # 64 MiB, freed before the phases
    del big
    phases: dict[str, float] = {}
    with phase_peak(device, phases, "small"):
        small = torch.empty(8 * 2**20, dtype=torch.uint8, device=device)
        del small
    assert 8 / 1024 <= phases["small"] < 64 / 1024  # the 64 MiB before the phase is not its peak
    assert peak_memory(device)["peak_gpu_gib"] >= 64 / 1024  # but still the run's


def test_layer_reports_carry_gpu_peaks_by_phase():
    model = tiny_model("llama")
    cfg = fast_config(0.25, refit="ls")
    cfg.runtime.device = "cuda"
    report = spap.prune(model, config=cfg, calibration_ids=tiny_ids(n=8, seq_len=32))
    for layer in report.layers:
        assert {"statistics", "solve", "propagate"} <= set(layer.gpu_peak_gib)
        assert max(layer.gpu_peak_gib.values()) <= report.memory["peak_gpu_gib"]
