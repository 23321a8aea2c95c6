"""The end-of-run summary says how to load the checkpoint, and where vLLM needs the DeciLM export."""

from __future__ import annotations

import json

import pytest

from spap.cli.summary import format_summary

REPORT = {"parameters_before": 630e6, "parameters_after": 504e6, "save_dtype": "bfloat16", "seconds": {"total": 12}}
QWEN = {"model_type": "qwen2", "hidden_size": 896, "head_dim": 64}


@pytest.mark.parametrize(
    ("config", "stock", "expected"),
    [
        ({**QWEN, "num_attention_heads": 14}, True, "(stock transformers, vLLM)"),
        # 7 heads of 64 in a 896-wide Qwen2: vLLM's Qwen2 takes head_dim = 896 / 7
        ({**QWEN, "num_attention_heads": 7}, True, "vLLM: spap export {out} --format decilm"),
        ({"model_type": "llama", "hidden_size": 576, "num_attention_heads": 3, "head_dim": 64}, True, "vLLM)"),
        ({**QWEN, "num_attention_heads": 14}, False, 'spap.load_pretrained("{out}")'),
    ],
)
def test_the_load_line_names_what_loads_the_checkpoint(tmp_path, config, stock, expected):
    (tmp_path / "config.json").write_text(json.dumps(config))
    summary = format_summary(tmp_path, REPORT, {}, None, stock)
    load = next(line for line in summary.splitlines() if line.strip().startswith("load"))
    assert expected.format(out=tmp_path) in load
    assert "parameters      630.0M -> 504.0M  (20.0% fewer)" in summary
