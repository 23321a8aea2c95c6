"""LLaMA-style decoder (LLaMA 1-3, Mistral, Qwen2/2.5/3, SmolLM2): GLU MLP gate/up/down_proj."""

from __future__ import annotations

from torch import nn

from .base import ArchitectureAdapter


class LlamaAdapter(ArchitectureAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
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
