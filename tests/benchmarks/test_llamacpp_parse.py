"""benchmarks/llamacpp.py reads llama-perplexity's estimate even when llama.cpp's log thread lost the
last lines at exit (llama.cpp#22142)."""

from __future__ import annotations

from llamacpp import parse_perplexity

RUNNING = "0.00 minutes\n[1]403.4004,[2]406.2149,[3]401.2220,\n\n"


def test_the_final_estimate_line_is_read_when_present():
    output = RUNNING + "perplexity: 0.02 seconds per pass\nFinal estimate: PPL = 401.2221 +/- 2.96908\n"
    assert parse_perplexity(output, chunks=3) == 401.2221


def test_the_last_chunks_running_estimate_stands_in_when_the_final_line_was_lost():
    assert parse_perplexity(RUNNING, chunks=3) == 401.2220


def test_an_estimate_short_of_the_last_chunk_is_no_estimate():
    assert parse_perplexity(RUNNING, chunks=4) is None
    assert parse_perplexity("perplexity: calculating perplexity over 8 chunks", chunks=8) is None
