"""Attention-head pruning of one decoder layer: remove whole KV groups, re-fit the output projection."""

from __future__ import annotations

import torch
from torch import nn

from . import distributed
from .adapters import ArchitectureAdapter
from .config import PruneConfig
from .core import MLPStatistics
from .core.heads import column_groups, prune_kv_groups
from .layerwise import LayerInputs, compute_copy, run_layer


def prune_layer_heads(
    model: nn.Module, adapter: ArchitectureAdapter, layer: nn.Module, index: int, inputs: LayerInputs,
    cfg: PruneConfig, device: torch.device, dtype: torch.dtype,
) -> tuple[list[int], float]:
    """Remove round(head_sparsity * n_kv) KV groups of ``layer`` and re-fit its output projection."""
    n_heads, n_kv, head_dim = adapter.attention_shape(layer)
    k = int(round(cfg.head_sparsity * n_kv))
    if k == 0:
        return list(range(n_kv)), 0.0
    o = adapter.attention_output_linear(layer)
    w_o = o.weight.detach().to(device, torch.float32)
    b_o = None if o.bias is None else o.bias.detach().to(device, torch.float32)
    stats = MLPStatistics(w_o.shape[1], w_o.shape[0], device)
    work = compute_copy(layer, device, dtype)

    def hook(_module: nn.Module, args: tuple) -> None:
        a = args[0].reshape(-1, args[0].shape[-1]).to(device, torch.float32)
        stats.add(a, torch.nn.functional.linear(a, w_o, b_o))

    handle = adapter.attention_output_linear(work).register_forward_pre_hook(hook)
    try:
        run_layer(work, inputs, device, dtype, keep_outputs=False)
    finally:
        handle.remove()
    distributed.all_reduce_statistics(stats)
    groups = column_groups(n_heads, n_kv, head_dim)
    result = prune_kv_groups(w_o, b_o, stats, groups, k, cfg.solver) if distributed.rank() == 0 else None
    keep = distributed.broadcast_object(result.keep_groups if result else None)
    weights = distributed.broadcast_object((result.o_weight, result.o_bias) if result else None)
    attributes = adapter.keep_kv_groups(layer, keep, weights[0], weights[1])
    if attributes:
        name = f"{adapter.layers_prefix(model)}.{index}.{_relative_name(layer, adapter.attention_module(layer))}"
        model.__dict__.setdefault("_spap_module_attributes", {})[name] = attributes
    return keep, result.error if result else float("nan")


def _relative_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise KeyError("module not found")
