"""Architecture adapter interface: the only code that knows a model family's module names."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

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
        ref = lin["up"].weight
        new = {
            "up": (weights.up, weights.up_bias),
            "down": (weights.down, weights.down_bias),
        }
        if "gate" in lin:
            new["gate"] = (weights.gate, weights.gate_bias)
        for role, (w, b) in new.items():
            old = lin[role]
            module = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=ref.device, dtype=ref.dtype)
            with torch.no_grad():
                module.weight.copy_(w)
                if b is not None:
                    module.bias.copy_(b)
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

    def layers_prefix(self, model: nn.Module) -> str:
        """Dotted name of the decoder-layer list inside ``model``."""
        layers = self.decoder_layers(model)
        for name, module in model.named_modules():
            if module is layers:
                return name
        raise KeyError("decoder layers not found")


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()
