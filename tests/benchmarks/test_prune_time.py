"""benchmarks/prune_time.py: the floor's FLOP count."""

from __future__ import annotations

from prune_time import floor_flops

from ..conftest import tiny_model


def test_floor_counts_every_linear_and_causal_attention():
    model = tiny_model("llama")  # 3 layers, hidden 32, MLP 48, 4 query heads of 8, 2 KV heads
    tokens, seq_len = 100, 20
    forward, stats, shape = floor_flops(model, tokens, seq_len)
    linear = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 48  # q, k and v, o, gate/up/down
    assert forward == 3 * tokens * (2 * linear + 2 * seq_len * 8 * 4)
    assert stats == 3 * tokens * 2 * (48 * 48 + 32 * 48)
    assert shape == [32, 48]
