"""OPT decoder: fc1 -> activation (ReLU) -> fc2, both with biases, directly on the decoder layer."""

from __future__ import annotations

from torch import nn

from .base import ArchitectureAdapter


class OPTAdapter(ArchitectureAdapter):
    model_types = ("opt",)
    width_attribute = "ffn_dim"

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.decoder.layers

    def mlp_output_is_residual(self, model: nn.Module) -> bool:
        return bool(model.config.do_layer_norm_before)  # OPT-350m normalises after the residual add

    def mlp_input_linear(self, layer: nn.Module) -> nn.Linear:
        return layer.fc1

    def mlp_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        return {"up": layer.fc1, "down": layer.fc2}

    def mlp_activation(self, layer: nn.Module) -> nn.Module:
        return layer.activation_fn

    def attention_projections(self, layer: nn.Module) -> dict[str, nn.Linear]:
        a = layer.self_attn
        return {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.out_proj}

    def attention_shape(self, layer: nn.Module) -> tuple[int, int, int]:
        a = layer.self_attn
        return a.num_heads, a.num_heads, a.head_dim  # multi-head attention: every head is its own group

    def head_attributes(self, n_heads: int, n_kv_heads: int) -> dict[str, int]:
        # OPTAttention reshapes with self.num_heads; OPTConfig cannot describe q/k/v narrower than
        # hidden_size, so pruned OPT heads load through spap's shape-aware class (remote code).
        return {"num_heads": n_heads}
