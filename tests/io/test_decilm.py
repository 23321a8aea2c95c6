"""DeciLM export: a checkpoint with per-layer MLP widths and KV groups becomes DeciLMForCausalLM with
block_configs; spap, stock transformers (trust_remote_code) and the attribute view vLLM reads all see
the same model, with logits identical to the source."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

import spap
from spap.cli import main
from spap.config import PruneConfig, RuntimeConfig
from spap.errors import UsageError
from spap.io.decilm import decilm_config, export_decilm
from spap.io.decilm_code import DeciLMConfig, ffn_mult_of, ffn_width

from ..conftest import VOCAB, tiny_ids, tiny_tokenizer

WIDTHS = [768, 512, 1024]  # kept MLP neurons per layer, multiples of 256


def _pruned(tmp_path, family: str = "llama", widths: list[int] = WIDTHS, heads: bool = True):
    """A spap checkpoint of a small model with ``widths`` and (``heads``) one of two KV groups removed."""
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    config = (LlamaConfig if family == "llama" else Qwen2Config)(**common, intermediate_size=1024)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    cfg = PruneConfig(
        target="both" if heads else "mlp",
        head_sparsity=0.5 if heads else 0.0,
        runtime=RuntimeConfig(compute_dtype="float32", device="cpu"),
    )
    spap.prune(model, config=cfg, calibration_ids=tiny_ids(), n_prune=[1024 - w for w in widths])
    return model, spap.save_pruned(model, tmp_path / "pruned", tiny_tokenizer())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_decilm_export_loads_with_identical_logits(tmp_path, family):
    model, pruned = _pruned(tmp_path, family)
    out = export_decilm(pruned, tmp_path / "decilm")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    blocks = config["block_configs"]
    assert [ffn_width(b["ffn"]["ffn_mult"], 64) for b in blocks] == WIDTHS
    # one of two KV groups removed with its query heads: 2 query heads sharing 1 KV head in every layer
    assert config["num_attention_heads"] == 2 and [b["attention"]["n_heads_in_group"] for b in blocks] == [2, 2, 2]
    ids = tiny_ids()
    with torch.no_grad():
        expected = model(ids).logits
        by_spap = spap.load_pretrained(out).eval()
        torch.testing.assert_close(by_spap(ids).logits, expected, rtol=1e-5, atol=1e-5)
    torch.save(ids, tmp_path / "ids.pt")
    # stock transformers without spap (a fresh process): the copied CODE_FILE builds the model
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval(); "
        "assert 'spap' not in sys.modules and type(m).__module__.endswith('modeling_spap_decilm'); "
        f"torch.save(m(torch.load({str(tmp_path / 'ids.pt')!r})).logits.detach(), {str(tmp_path / 'logits.pt')!r})"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-5, atol=1e-5)
    block = by_spap.config.block_configs[1]  # how vLLM reads them: attributes
    assert block.ffn.ffn_mult == blocks[1]["ffn"]["ffn_mult"] and block.attention.no_op is False
    assert not hasattr(block.ffn, "intermediate_size")


def test_widths_that_are_not_multiples_of_256_are_refused_with_the_fix(tmp_path):
    _, pruned = _pruned(tmp_path, widths=[768, 500, 1024], heads=False)
    with pytest.raises(UsageError, match="layer 1 keeps 500 MLP neurons; .* --width-multiple 256"):
        decilm_config(pruned)
    assert main(["export", str(pruned), "--format", "decilm"]) == 2
    assert not (tmp_path / "pruned-decilm").exists()


def test_the_cli_writes_the_export_next_to_the_checkpoint(tmp_path, capsys):
    _, pruned = _pruned(tmp_path, heads=False)
    assert main(["export", str(pruned), "--format", "decilm"]) == 0
    assert "vllm serve" in capsys.readouterr().out
    assert DeciLMConfig.from_pretrained(tmp_path / "pruned-decilm").layer_shapes() == [(w, 2) for w in WIDTHS]


@pytest.mark.parametrize("hidden", [576, 896, 1536, 4096, 8192])
def test_every_width_round_trips_through_ffn_mult(hidden):
    for width in range(256, 4 * hidden + 1, 256):
        assert ffn_width(ffn_mult_of(width, hidden), hidden) == width


FAKE_DECI_CONVERTER = """
import os, sys
from conversion.deci import DeciModel
args = sys.argv[1:]
open(args[args.index("--outfile") + 1], "w").write(DeciModel.set_vocab.__name__)
"""
FAKE_DECI_CLASS = """
class DeciModel:
    def set_vocab(self): ...
    def _set_vocab_gpt2(self): ...
"""


def test_gguf_export_of_per_layer_shapes_shows_the_converter_decilm(tmp_path, capsys):
    """``spap export DIR`` of a per-layer checkpoint: the converter reads the DeciLM config beside
    links to the checkpoint's weights (nothing copied, the checkpoint untouched); shapes DeciLM cannot
    hold are refused naming the way out."""
    from spap.io.llamacpp import export_gguf

    from ..cli.test_cli_failures import _one_error_line
    from .test_export import FAKE_CONVERTER

    converter = tmp_path / "convert_hf_to_gguf.py"
    converter.write_text(FAKE_CONVERTER)
    _, pruned = _pruned(tmp_path, heads=False)
    before = (pruned / "config.json").read_text()
    tokenizer = json.loads((pruned / "tokenizer.json").read_text())
    tokenizer["model"]["byte_fallback"] = True  # the converter's own DeciLM vocabulary path
    (pruned / "tokenizer.json").write_text(json.dumps(tokenizer))
    seen = json.loads(export_gguf(pruned, tmp_path / "model.gguf", converter=converter).read_text())
    assert seen["architectures"] == ["DeciLMForCausalLM"] and "model.safetensors" in seen["files"]
    assert (pruned / "config.json").read_text() == before

    _, odd = _pruned(tmp_path / "odd", widths=[700, 512, 1024], heads=False)
    assert main(["export", str(odd), "--converter", str(converter)]) == 2
    error = _one_error_line(capsys.readouterr().err)
    assert "--width-multiple 256" in error and "--pad-to-uniform" in error
    assert not list(odd.glob("*.gguf"))


@pytest.mark.parametrize("byte_fallback", [False, True])
def test_gguf_export_of_a_decilm_checkpoint_writes_its_tokenizers_vocabulary(tmp_path, byte_fallback):
    """llama.cpp's DeciLM converter writes a byte-level BPE vocabulary (SmolLM2's, Qwen's) only for
    LLaMA-3's 128,256 tokens: spap runs it with its own byte-level writer (``_set_vocab_gpt2``) for
    other sizes; a byte-fallback tokenizer keeps the converter's DeciLM path."""
    from spap.io.llamacpp import export_gguf

    _, pruned = _pruned(tmp_path, heads=False)  # a byte-level BPE tokenizer
    decilm = export_decilm(pruned, tmp_path / "decilm")
    if byte_fallback:
        tokenizer = json.loads((decilm / "tokenizer.json").read_text())
        tokenizer["model"]["byte_fallback"] = True
        (decilm / "tokenizer.json").write_text(json.dumps(tokenizer))
    converter = tmp_path / "llama.cpp" / "convert_hf_to_gguf.py"
    (converter.parent / "conversion").mkdir(parents=True)
    (converter.parent / "conversion" / "__init__.py").write_text("")
    (converter.parent / "conversion" / "deci.py").write_text(FAKE_DECI_CLASS)
    converter.write_text(FAKE_DECI_CONVERTER)
    out = export_gguf(decilm, tmp_path / "model.gguf", converter=converter)
    assert out.read_text() == ("set_vocab" if byte_fallback else "_set_vocab_gpt2")


def test_gguf_export_of_a_decilm_checkpoint_without_a_bpe_tokenizer_is_refused(tmp_path):
    from spap.io.llamacpp import export_gguf

    _, pruned = _pruned(tmp_path, heads=False)
    decilm = export_decilm(pruned, tmp_path / "decilm")
    tokenizer = json.loads((decilm / "tokenizer.json").read_text())
    tokenizer["model"]["type"] = "WordPiece"
    (decilm / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(UsageError, match="DeciLM converter takes a BPE tokenizer"):
        export_gguf(decilm, tmp_path / "model.gguf", converter=tmp_path / "unused.py")
    assert not (tmp_path / "model.gguf").exists()
