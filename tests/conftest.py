"""Tiny random models of each supported family, built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

VOCAB = 97


def tiny_config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, max_position_embeddings=128)
    if family == "llama":
        return LlamaConfig(
            **common, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
        )
    if family == "qwen2":
        return Qwen2Config(**common, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2)
    if family == "mistral":
        return MistralConfig(**common, intermediate_size=44, num_attention_heads=4, num_key_value_heads=1)
    if family == "qwen2_sliding":  # layers 1.. use a 4-token sliding window, layer 0 full attention
        return Qwen2Config(
            **common,
            intermediate_size=40,
            num_attention_heads=4,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
        )
    gemma = dict(**common, intermediate_size=36, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    if family == "gemma":  # GeGLU, scaled embeddings, explicit head_dim
        return GemmaConfig(**gemma)
    if family == "gemma2":  # every other layer sliding-window attention, MLP output normalised
        return Gemma2Config(**gemma, sliding_window=8)
    if family == "gemma3_text":  # per-kind rotary embeddings too
        return Gemma3TextConfig(**gemma, sliding_window=8, sliding_window_pattern=2)
    if family == "opt":
        return OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=3,
            ffn_dim=56,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
            do_layer_norm_before=True,
        )
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    # Random init gives near-identical tiny weights; spread them so pruning has something to choose.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


def tiny_ids(n: int = 6, seq_len: int = 24, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seq_len), generator=gen)


FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3_text", "opt"]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab VOCAB) trained offline on the bundled text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from spap.io.calibration import bundled_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>", "</s>"], show_progress=False, initial_alphabet=[]
    )
    tok.train_from_iterator([bundled_text()[:20000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A saved tiny LLaMA checkpoint with a tokenizer, as a user would pass to the CLI."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama")
    model.config.vocab_size = VOCAB
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
