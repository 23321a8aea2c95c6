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
