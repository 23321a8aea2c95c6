"""benchmarks/llamacpp.py gives llama.cpp the text spap scores, and reads llama-perplexity's estimate
even when llama.cpp's log thread lost the last lines at exit (llama.cpp#22142)."""

from __future__ import annotations

from llamacpp import as_spap_reads, parse_perplexity

from spap.io.calibration import read_text_file

RUNNING = "0.00 minutes\n[1]403.4004,[2]406.2149,[3]401.2220,\n\n"


def test_the_final_estimate_line_is_read_when_present():
    output = RUNNING + "perplexity: 0.02 seconds per pass\nFinal estimate: PPL = 401.2221 +/- 2.96908\n"
    assert parse_perplexity(output, chunks=3) == 401.2221


def test_the_last_chunks_running_estimate_stands_in_when_the_final_line_was_lost():
    assert parse_perplexity(RUNNING, chunks=3) == 401.2220


def test_an_estimate_short_of_the_last_chunk_is_no_estimate():
    assert parse_perplexity(RUNNING, chunks=4) is None
    assert parse_perplexity("perplexity: calculating perplexity over 8 chunks", chunks=8) is None


def test_llama_cpp_reads_the_bytes_of_the_very_string_spap_scores(tmp_path):
    """WikiText raw files get spap's "\\n\\n".join layout (blank lines dropped, CRLF gone): llama.cpp,
    which tokenises the file's bytes, must get that string, not the raw file."""
    raw = tmp_path / "wiki.test.raw"
    raw.write_bytes(b" = Title = \r\n\r\n Some text , with @-@ marks .\r\n\r\n\r\n More text .\r\n")
    copy = as_spap_reads(raw, tmp_path)
    scored = read_text_file(raw)
    assert scored == " = Title = \n\n Some text , with @-@ marks .\n\n More text ."
    assert copy.read_bytes().decode() == scored
    assert read_text_file(copy) == scored  # spap reading the copy applies no second layout
