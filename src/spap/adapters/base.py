"""Architecture adapter interface: the only code that knows a model family's module names."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.mlp import MLPWeights


class UnsupportedArchitectureError(ValueError):
    """The model's family has no adapter."""


class ArchitectureAdapter(ABC):
    """Maps a Hugging Face causal LM onto spap's functional views (MLPWeights, ...)."""

    model_types: ClassVar[tuple[str, ...]] = ()
    width_attribute: ClassVar[str] = "intermediate_size"  # config field holding the MLP width

    @abstractmethod
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The list of decoder layers, in order."""

    @abstractmethod
    def mlp_input_linear(self, layer: nn.Module) -> nn.Linear:
        """A Linear whose input is the MLP input x (hooked to collect statistics)."""

    @abstractmethod
    def mlp_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """Linears of the MLP keyed by role: 'up', 'down' and, for GLU MLPs, 'gate'."""

    @abstractmethod
    def mlp_activation(self, layer: nn.Module) -> nn.Module:
        """The MLP's elementwise activation."""

    def read_mlp(self, layer: nn.Module) -> MLPWeights:
        """Functional view sharing storage with the layer (do not modify in place)."""
        lin = self.mlp_linears(layer)
        gate = lin.get("gate")
        return MLPWeights(
            up=lin["up"].weight.detach(),
            down=lin["down"].weight.detach(),
            activation=self.mlp_activation(layer),
            gate=None if gate is None else gate.weight.detach(),
            up_bias=_bias(lin["up"]),
            gate_bias=None if gate is None else _bias(gate),
            down_bias=_bias(lin["down"]),
        )

    def write_mlp(self, layer: nn.Module, weights: MLPWeights) -> None:
        """Replace the MLP Linears by ones of the new width holding ``weights`` (cast to the layer dtype)."""
        lin = self.mlp_linears(layer)
        new: dict[str, tuple[Tensor | None, Tensor | None]] = {
            "up": (weights.up, weights.up_bias),
            "down": (weights.down, weights.down_bias),
        }
        if "gate" in lin:
            new["gate"] = (weights.gate, weights.gate_bias)
        for role, (w, b) in new.items():
            assert w is not None  # gate is listed only for gated MLPs
            self._replace_linear(layer, lin[role], w, b)

    def mlp_output_is_residual(self, model: nn.Module) -> bool:
        """True if every layer computes out = h + mlp(norm(h)) with nothing after the MLP."""
        return True

    # --- attention heads -------------------------------------------------------------------
    def attention_output_linear(self, layer: nn.Module) -> nn.Linear:
        """The attention output projection (its input is the concatenated head outputs)."""
        return self.attention_projections(layer)["o"]

    def attention_projections(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """q, k, v, o Linears of the layer's attention."""
        raise NotImplementedError(f"{type(self).__name__} does not support head pruning")

    def attention_shape(self, layer: nn.Module) -> tuple[int, int, int]:
        """(query heads, KV heads, head_dim) of the layer as it is now."""
        raise NotImplementedError(f"{type(self).__name__} does not support head pruning")

    def head_attributes(self, n_heads: int, n_kv_heads: int) -> dict[str, int]:
        """Attributes of the attention module that must follow its head counts (none by default)."""
        return {}

    def head_config(self, n_heads: int, n_kv_heads: int, head_dim: int) -> dict[str, int]:
        """Config fields that describe uniform head counts ({} if the stock config cannot)."""
        return {}

    def keep_kv_groups(
        self, layer: nn.Module, keep: list[int], o_weight: torch.Tensor, o_bias: torch.Tensor | None
    ) -> dict[str, int]:
        """Keep only KV groups ``keep`` (rows of q/k/v, o_proj columns <- o_weight); returns module attributes set."""
        n_heads, n_kv, _ = self.attention_shape(layer)
        per_group = n_heads // n_kv
        q_heads = [g * per_group + j for g in keep for j in range(per_group)]
        return self._keep_heads(layer, q_heads, keep, o_weight, o_bias)

    def keep_query_heads(
        self, layer: nn.Module, keep: list[int], o_weight: torch.Tensor, o_bias: torch.Tensor | None
    ) -> dict[str, int]:
        """Keep only query heads ``keep`` (rows of q, o_proj columns <- o_weight), every KV head; the
        same number must remain in every KV group.  Returns module attributes set."""
        n_heads, n_kv, _ = self.attention_shape(layer)
        per_group = n_heads // n_kv
        counts = {g: sum(1 for h in keep if h // per_group == g) for g in range(n_kv)}
        if len(set(counts.values())) != 1 or 0 in counts.values():
            raise ValueError(f"query heads {keep} leave unequal or empty KV groups: {counts}")
        return self._keep_heads(layer, keep, list(range(n_kv)), o_weight, o_bias)

    def _keep_heads(
        self,
        layer: nn.Module,
        q_heads: list[int],
        kv_heads: list[int],
        o_weight: torch.Tensor,
        o_bias: torch.Tensor | None,
    ) -> dict[str, int]:
        head_dim = self.attention_shape(layer)[2]
        proj = self.attention_projections(layer)

        def rows(heads: list[int]) -> torch.Tensor:
            return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])

        q_rows, kv_rows = rows(q_heads), rows(kv_heads)
        for name, idx in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
            old = proj[name]
            if old.out_features != len(idx):
                self._replace_linear(
                    layer, old, old.weight.detach()[idx], None if old.bias is None else old.bias.detach()[idx]
                )
        self._replace_linear(layer, proj["o"], o_weight, o_bias)
        attributes = self.head_attributes(len(q_heads), len(kv_heads))
        module = self.attention_module(layer)
        for key, value in attributes.items():
            setattr(module, key, value)
        return attributes

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def _replace_linear(
        self, layer: nn.Module, old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        module = nn.Linear(
            weight.shape[1], weight.shape[0], bias=bias is not None, device=old.weight.device, dtype=old.weight.dtype
        )
        with torch.no_grad():
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
        parent, name = self._parent_of(layer, old)
        setattr(parent, name, module)

    def mlp_width(self, layer: nn.Module) -> int:
        return self.mlp_linears(layer)["up"].out_features

    @staticmethod
    def _parent_of(root: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
        for module in root.modules():
            for name, child in module.named_children():
                if child is target:
                    return module, name
        raise KeyError("module not found under layer")

    def remove_layers(self, model: nn.Module, indices: list[int]) -> None:
        """Delete the decoder layers ``indices`` in place. The kept layers are renumbered (every
        ``layer_idx``, which indexes the KV cache) and the config follows: ``num_hidden_layers``,
        ``layer_types`` (sliding / full attention per layer) and Qwen2's ``max_window_layers``, so a
        stock class built from it has the same layers."""
        layers = self.decoder_layers(model)
        drop = set(indices)
        if not drop <= set(range(len(layers))) or len(drop) >= len(layers):
            raise ValueError(f"cannot remove layers {sorted(drop)} of {len(layers)}")
        kept = [layer for i, layer in enumerate(layers) if i not in drop]
        for new_index, layer in enumerate(kept):
            for module in layer.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new_index  # type: ignore[assignment]
        parent, name = self._parent_of(model, layers)
        setattr(parent, name, nn.ModuleList(kept))
        config: Any = model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        types = getattr(config, "layer_types", None)
        if types is not None:
            config.layer_types = [t for i, t in enumerate(types) if i not in drop]
        if isinstance(getattr(config, "max_window_layers", None), int):
            config.max_window_layers = sum(i not in drop for i in range(min(config.max_window_layers, len(layers))))
        config.num_hidden_layers = len(kept)

    def layers_prefix(self, model: nn.Module) -> str:
        """Dotted name of the decoder-layer list inside ``model``."""
        layers = self.decoder_layers(model)
        for name, module in model.named_modules():
            if module is layers:
                return name
        raise KeyError("decoder layers not found")


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()
