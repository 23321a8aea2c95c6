"""Architecture adapters, looked up by ``config.model_type``."""

from __future__ import annotations

from torch import nn

from .base import ArchitectureAdapter, UnsupportedArchitectureError
from .gemma import GemmaAdapter
from .llama import LlamaAdapter
from .opt import OPTAdapter

ADAPTERS: tuple[type[ArchitectureAdapter], ...] = (LlamaAdapter, GemmaAdapter, OPTAdapter)


def supported_model_types() -> list[str]:
    return sorted(t for cls in ADAPTERS for t in cls.model_types)


def get_adapter(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for ``model`` (a transformers causal LM), or UnsupportedArchitectureError."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls()
    raise UnsupportedArchitectureError(
        f"model family {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
    )


__all__ = ["ArchitectureAdapter", "UnsupportedArchitectureError", "get_adapter", "supported_model_types"]
