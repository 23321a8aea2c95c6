"""Attention-head pruning of one decoder layer: remove whole KV groups (or query heads within every KV
group), re-fit the output projection."""

from __future__ import annotations

import torch
from torch import nn

from ..core import MLPStatistics
from ..core.heads import column_groups, prune_kv_groups, prune_query_heads
from ..runtime.layerwise import LayerInputs, compute_copy, run_layer
from . import distributed
from .context import LayerContext


def prune_layer_heads(ctx: LayerContext, layer: nn.Module, inputs: LayerInputs) -> tuple[list[int], float]:
    """Remove round(head_sparsity * n_kv) KV groups of ``layer`` (head_unit "kv-group") or
    round(head_sparsity * n_heads / n_kv) query heads of every KV group ("query"), and re-fit its
    output projection.  Returns (units kept, relative error of the attention output)."""
    adapter, cfg, device, dtype = ctx.adapter, ctx.cfg, ctx.device, ctx.dtype
    n_heads, n_kv, head_dim = adapter.attention_shape(layer)
    by_query = cfg.head_unit == "query"
    k = heads_to_prune(cfg.head_unit, cfg.head_sparsity, n_heads, n_kv)
    if k == 0:
        return list(range(n_kv)), 0.0
    o = adapter.attention_output_linear(layer)
    w_o = o.weight.detach().to(device, torch.float32)
    b_o = None if o.bias is None else o.bias.detach().to(device, torch.float32)
    stats = MLPStatistics(w_o.shape[1], w_o.shape[0], device)
    work = compute_copy(layer, device, dtype)

    def hook(_module: nn.Module, args: tuple) -> None:
        a = args[0].reshape(-1, args[0].shape[-1])
        a32 = a.to(device, torch.float32)
        stats.add(a32, torch.nn.functional.linear(a32, w_o, b_o), z_bf16=a.dtype == torch.bfloat16)

    handle = adapter.attention_output_linear(work).register_forward_pre_hook(hook)
    try:
        run_layer(work, inputs, device, dtype, keep_outputs=False)
    finally:
        handle.remove()
    distributed.all_reduce_statistics(stats)
    result = None
    if distributed.rank() == 0:
        if by_query:
            result = prune_query_heads(w_o, b_o, stats, n_heads, n_kv, k, cfg.solver)
        else:
            result = prune_kv_groups(w_o, b_o, stats, column_groups(n_heads, n_kv, head_dim), k, cfg.solver)
    keep = distributed.broadcast_object(result.kept if result else None)
    weights = distributed.broadcast_object((result.o_weight, result.o_bias) if result else None)
    apply = adapter.keep_query_heads if by_query else adapter.keep_kv_groups
    apply(layer, keep, weights[0], weights[1])  # export_config reads the changed head attributes back
    return keep, result.error if result else float("nan")


def heads_to_prune(head_unit: str, head_sparsity: float, n_heads: int, n_kv: int) -> int:
    """Units removed per layer: round(head_sparsity * n_kv) KV groups ("kv-group"), or query heads
    per KV group ("query", see ``query_heads_to_prune``)."""
    if head_unit == "query":
        return query_heads_to_prune(head_sparsity, n_heads, n_kv)
    return int(round(head_sparsity * n_kv))


def query_heads_to_prune(head_sparsity: float, n_heads: int, n_kv: int) -> int:
    """round(head_sparsity * query heads per KV group), refused where it removes none or all of them."""
    per_group = n_heads // n_kv
    k = int(round(head_sparsity * per_group))
    if per_group == 1:
        raise ValueError(
            "head_unit 'query' needs grouped-query attention (several query heads per KV head); "
            "this model has one query head per KV head: use head_unit 'kv-group'"
        )
    if not 0 < k < per_group:
        raise ValueError(
            f"head_sparsity {head_sparsity} removes {k} of the {per_group} query heads of each KV group; "
            f"choose a value in [{0.5 / per_group:.3f}, {1 - 0.5 / per_group:.3f})"
        )
    return k
