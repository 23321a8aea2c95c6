"""benchmarks/studies/disjoint_split.py: the calibration tail shares no token with the evaluated prefix."""

from __future__ import annotations

import pytest
from disjoint_split import tail_after

from spap.io.calibration import bundled_text, tokenize

from ..conftest import tiny_tokenizer


def test_tail_is_exactly_the_tokens_after_prefix_and_margin():
    tokenizer = tiny_tokenizer()
    text = bundled_text()[:6000]
    ids = tokenize(tokenizer, text)
    tail, start, total = tail_after(tokenizer, text, skip_tokens=300, margin=50)
    assert (start, total) == (350, ids.numel())
    head = tokenizer.decode(ids[:350])  # the evaluated prefix and the margin
    assert head + tail == text  # nothing dropped, nothing of the prefix repeated
    assert len(tokenize(tokenizer, head)) == 350


def test_nothing_left_is_an_error():
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="none left"):
        tail_after(tokenizer, "a short text", skip_tokens=100, margin=0)
