"""benchmarks/common.capture_dense: the capture dtype."""

from __future__ import annotations

import torch
from common import capture_dense

from spap.adapters import get_adapter

from ..conftest import tiny_ids, tiny_model


def test_capture_in_float32_equals_hooks_on_a_plain_forward():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    ids = tiny_ids(n=3, seq_len=12)
    xs, hs = capture_dense(model, adapter, ids, [1], outputs=True, batch_size=2, dtype=torch.float32)
    layer = adapter.decoder_layers(model)[1]
    seen = []
    handle = layer.register_forward_hook(lambda _m, _a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    assert xs[1].shape == (36, 32) and torch.allclose(hs[1], seen[0].flatten(0, 1), atol=1e-5)
    xs16, _ = capture_dense(model, adapter, ids, [1], batch_size=2)  # default: bf16 autocast
    assert not torch.equal(xs16[1], xs[1]) and torch.allclose(xs16[1], xs[1], atol=0.1, rtol=0.1)
