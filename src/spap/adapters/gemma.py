"""Gemma 1-3 (text): LLaMA module names; Gemma 2/3 normalise the MLP output before the residual add."""

from __future__ import annotations

from torch import nn

from .llama import LlamaAdapter


class GemmaAdapter(LlamaAdapter):
    model_types = ("gemma", "gemma2", "gemma3_text")

    def mlp_output_is_residual(self, model: nn.Module) -> bool:
        # Gemma 2/3: out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))
        return model.config.model_type == "gemma"
