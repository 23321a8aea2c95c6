"""LLaMA-style decoder (LLaMA 1-3, Mistral, Qwen2/2.5/3, SmolLM2): GLU MLP gate/up/down_proj."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from .base import ArchitectureAdapter


class LlamaAdapter(ArchitectureAdapter):
    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2", "qwen3")
    width_attribute = "intermediate_size"

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def mlp_input_linear(self, layer: nn.Module) -> nn.Linear:
        return layer.mlp.up_proj

    def mlp_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        mlp = layer.mlp
        return {"gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}

    def mlp_activation(self, layer: nn.Module) -> nn.Module:
        return layer.mlp.act_fn

    def attention_projections(self, layer: nn.Module) -> dict[str, nn.Linear]:
        a = layer.self_attn
        return {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj}

    def attention_shape(self, layer: nn.Module) -> tuple[int, int, int]:
        a = layer.self_attn
        return a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim, a.head_dim

    def head_attributes(self, n_heads: int, n_kv_heads: int) -> dict[str, int]:
        # repeat_kv / SDPA's GQA path read it; query-head pruning changes it
        return {"num_key_value_groups": n_heads // n_kv_heads}

    def head_config(self, n_heads: int, n_kv_heads: int, head_dim: int) -> dict[str, int]:
        # explicit head_dim: it no longer equals hidden_size / num_attention_heads
        return {"num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads, "head_dim": head_dim}
