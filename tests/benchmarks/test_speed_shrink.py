"""benchmarks/speed.py builds its pruned models by slicing shapes; they must be valid, runnable models."""

from __future__ import annotations

import pytest
import torch
from speed import shrink

from spap.adapters import get_adapter
from spap.evaluation.speed import decode_latency

from ..conftest import tiny_ids, tiny_model


@pytest.mark.parametrize(("head_unit", "expected_heads"), [("kv-group", (2, 1)), ("query", (2, 2))])
def test_shrunk_model_has_the_cut_shapes_and_decodes_with_a_static_cache(head_unit, expected_heads):
    dense = tiny_model("llama")  # 4 query heads in 2 KV groups, MLP width 48
    pruned = shrink(dense, 0.5, head_fraction=0.5, head_unit=head_unit)
    adapter = get_adapter(pruned)
    head_dim = adapter.attention_shape(adapter.decoder_layers(dense)[0])[2]
    for layer in adapter.decoder_layers(pruned):
        assert adapter.mlp_width(layer) == 24
        assert adapter.attention_shape(layer) == (*expected_heads, head_dim)
        assert adapter.attention_module(layer).num_key_value_groups == expected_heads[0] // expected_heads[1]
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == expected_heads
    assert adapter.mlp_width(adapter.decoder_layers(dense)[0]) == 48  # the dense model is untouched
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=tiny_ids()[:1]).logits).all()
    assert decode_latency(pruned, batch=2, prompt_len=8, new_tokens=4, graphs=False) > 0
