"""OPT decoder: fc1 -> activation (ReLU) -> fc2, both with biases, directly on the decoder layer."""

from __future__ import annotations

from torch import nn

from .base import ArchitectureAdapter


class OPTAdapter(ArchitectureAdapter):
    model_types = ("opt",)
    width_attribute = "ffn_dim"

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.decoder.layers

    def mlp_input_linear(self, layer: nn.Module) -> nn.Linear:
        return layer.fc1

    def mlp_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        return {"up": layer.fc1, "down": layer.fc2}

    def mlp_activation(self, layer: nn.Module) -> nn.Module:
        return layer.activation_fn
