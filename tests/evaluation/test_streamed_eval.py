"""Streamed perplexity (one decoder layer in memory) equals the in-memory computation."""

import pytest
import torch

import spap
from spap.evaluation.perplexity import perplexity
from spap.evaluation.streamed import streamed_perplexity
from spap.io.calibration import bundled_text

from ..conftest import VOCAB, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_perplexity_equals_the_in_memory_one_for_every_family(family, dtype, tokenizer, tmp_path):
    model = tiny_model(family)
    model.config.vocab_size = VOCAB
    model.to(dtype).save_pretrained(tmp_path)  # a bf16 checkpoint evaluated in bf16 keeps its head in bf16
    text = bundled_text()[:6000]
    loaded = spap.load_pretrained(tmp_path)  # as `spap eval` holds it: float32 weights
    expected = perplexity(loaded, tokenizer, text, 32, dtype=dtype, max_windows=7, progress=False)
    # chunks of 2 windows: the states of several chunks, batches and layers all go through the stream
    chunk_bytes = 2 * 2 * 32 * model.config.hidden_size * 4
    got = streamed_perplexity(
        tmp_path, tokenizer, text, 32, dtype=dtype, max_windows=7, max_hidden_bytes=chunk_bytes, progress=False
    )
    assert got.n_windows == expected.n_windows == 7
    assert got.n_predicted_tokens == expected.n_predicted_tokens
    assert got.nll == pytest.approx(expected.nll, rel=1e-6)


def test_streamed_perplexity_scores_from_a_position(tokenizer, tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    text = bundled_text()[:6000]
    loaded = spap.load_pretrained(tmp_path)
    expected = perplexity(loaded, tokenizer, text, 32, max_windows=4, score_from=16, progress=False)
    got = streamed_perplexity(tmp_path, tokenizer, text, 32, max_windows=4, score_from=16, progress=False)
    assert got.nll == pytest.approx(expected.nll, rel=1e-6) and got.score_from == 16
