"""Speed harness on CPU: byte accounting and the dense-vs-pruned comparison (timings are not asserted)."""

import torch

import spap
from spap.evaluation.speed import compare, compare_results, decode_bytes_per_step, decode_latency, measure, weight_bytes

from ..conftest import tiny_ids, tiny_model
from ..pruning.test_pipeline import fast_config


def test_decode_bytes_skip_the_input_embedding_unless_tied():
    model = tiny_model("llama")
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embedding
    skipped = 0 if tied else embedding.numel() * embedding.element_size()
    assert decode_bytes_per_step(model) == weight_bytes(model) - skipped


def test_pruned_model_reads_fewer_bytes_and_ratios_are_consistent():
    dense, pruned = tiny_model("llama"), tiny_model("llama")
    spap.prune(pruned, config=fast_config(0.5, refit="ls"), calibration_ids=tiny_ids())
    settings = dict(prefill_batch=1, prefill_len=16, decode_batch=2, new_tokens=4)
    d, p = measure(dense, **settings), measure(pruned, **settings)
    c = compare_results(d, p)
    assert c["byte_ratio_limit"] == d.decode_bytes / p.decode_bytes > 1
    assert c["weight_memory_ratio"] < 1
    assert c["decode_speedup_batch1"] == d.decode_ms_batch1 / p.decode_ms_batch1
    assert set(compare(dense, pruned, **settings)) == set(c)


def test_eager_decode_latency_is_positive_and_finite():
    ms = decode_latency(tiny_model("llama"), batch=2, prompt_len=8, new_tokens=4, graphs=False)
    assert torch.isfinite(torch.tensor(ms)) and ms > 0


def test_cache_keyword_is_the_name_the_forward_takes():
    import inspect

    from spap.evaluation.speed import cache_keyword

    class OldForward(torch.nn.Module):  # transformers before the rename to ``cache``
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            return input_ids

    assert cache_keyword(OldForward()) == "past_key_values"
    model = tiny_model("llama")
    assert cache_keyword(model) in inspect.signature(model.forward).parameters
