"""One parameter budget across MLP width, attention heads and depth: ``target_ratio`` of the parameters
removed, the mix chosen by measurement.

Every candidate removes the same number of parameters (within one MLP neuron per layer): ``d`` whole
decoder layers (the least-changing ones, ``pruning.depth``) and a uniform MLP sparsity ``s`` of the
layers that stay, with ``d`` from 0 up to the most layers the budget allows; and, where the family
writes head-pruned checkpoints that load stock (GQA models with more than one KV group), one KV group
per layer with the MLP sparsity that completes the budget. Each candidate is pruned
from a copy of the dense model with the fast recipe (closed-form reconstruction, no refit) on the
calibration windows, and scored by its next-token loss on calibration windows held out from them;
the lowest loss wins, and the run then prunes with the user's recipe at that mix. Every measured
candidate is reported (the frontier explored).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters import ArchitectureAdapter
from ..config import PruneConfig
from .depth import angular_distances, least_changing_layers

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One mix of the budget: layers removed, MLP sparsity of the rest, and what it measured."""

    drop_layers: int
    sparsity: float
    parameters_removed: int  # predicted from the dense model's shapes
    held_out_loss: float | None = None  # mean next-token NLL on the held-out calibration windows
    kv_groups_removed: int = 0  # per layer
    kv_groups: int = 0  # per layer, before pruning (for the head fraction)

    def config(self, cfg: PruneConfig) -> PruneConfig:
        """``cfg`` with this mix: sparsity, layers and (KV groups) head sparsity set."""
        heads = self.kv_groups_removed / self.kv_groups if self.kv_groups_removed else 0.0
        target = cfg.target if not heads else "both"
        return replace(
            cfg,
            sparsity=self.sparsity,
            drop_layers=self.drop_layers,
            head_sparsity=heads,
            head_unit="kv-group",
            target=target,
        )


def layer_costs(model: nn.Module, adapter: ArchitectureAdapter) -> tuple[int, list[int], list[int]]:
    """(all parameters, parameters of each decoder layer, parameters of one MLP neuron in each layer)."""
    total = sum(p.numel() for p in model.parameters())
    per_layer, per_neuron = [], []
    for layer in adapter.decoder_layers(model):
        per_layer.append(sum(p.numel() for p in layer.parameters()))
        linears = adapter.mlp_linears(layer)
        neuron = sum(lin.in_features + (lin.bias is not None) for key, lin in linears.items() if key != "down")
        per_neuron.append(neuron + linears["down"].out_features)
    return total, per_layer, per_neuron


def kv_group_cost(adapter: ArchitectureAdapter, layer: nn.Module) -> tuple[int, int]:
    """(KV groups of ``layer``, parameters of one KV group: its q/k/v rows and o columns), or (0, 0)
    where removing KV groups would not give a stock checkpoint (one group, or a family whose config
    cannot describe it)."""
    try:
        n_heads, n_kv, head_dim = adapter.attention_shape(layer)
    except NotImplementedError:
        return 0, 0
    if n_kv < 2 or not adapter.head_config(n_heads, n_kv, head_dim):
        return 0, 0
    linears = adapter.attention_projections(layer)
    rows = sum(
        linears[k].weight.numel() + (linears[k].bias.numel() if linears[k].bias is not None else 0) for k in "qkv"
    )
    return n_kv, (rows + linears["o"].weight.numel()) // n_kv


def candidates(
    model: nn.Module, adapter: ArchitectureAdapter, ratio: float, count: int = 4, max_sparsity: float = 0.8
) -> list[Candidate]:
    """Up to ``count`` mixes that each remove ``ratio`` of the parameters, from width only to as many
    whole layers as fit (depth then topped up with width), evenly spaced in the number of layers; and
    one KV group per layer topped up with width, where that writes a stock checkpoint."""
    total, per_layer, per_neuron = layer_costs(model, adapter)
    budget = ratio * total
    n, layer, neuron = len(per_layer), max(per_layer), max(per_neuron)  # decoder layers share one shape here
    blocks = adapter.decoder_layers(model)
    width = min(adapter.mlp_width(block) for block in blocks)
    kv_groups, group = kv_group_cost(adapter, blocks[0])
    deepest = min(int(budget // layer), n - 1)
    mixes = [(d, 0) for d in sorted({round(i * deepest / max(count - 1, 1)) for i in range(count)})]
    if kv_groups:
        mixes.append((0, 1))
    out = []
    for d, heads in mixes:
        sparsity = (budget - d * layer - (n - d) * heads * group) / ((n - d) * width * neuron)
        if 0 <= sparsity <= max_sparsity:
            removed = d * layer + (n - d) * (round(sparsity * width) * neuron + heads * group)
            out.append(Candidate(d, round(sparsity, 4), int(removed), None, heads, kv_groups))
    if not out:
        raise ValueError(f"target_ratio {ratio} cannot be met with MLP sparsity <= {max_sparsity} and whole layers")
    return out


HEAD_BYTES = 2**28
"""float32 logits held at once while a candidate is scored (the output head runs on slices of positions)."""


@torch.no_grad()
def held_out_loss(model: nn.Module, ids: Tensor, batch_size: int, device: torch.device, dtype: torch.dtype) -> float:
    """Mean next-token negative log-likelihood of ``model`` on the windows ``ids`` (n, seq_len); the
    logits of a batch are never all in memory (8 x 2048 x 49k float32 would be 3 GiB)."""
    from ..evaluation.perplexity import final_hidden_states, sliced_nll
    from ..runtime.device import autocast_for

    model.to(device)
    total, count = 0.0, 0
    with autocast_for(model, dtype):
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(device)
            hidden = final_hidden_states(model, batch)[:, :-1]
            targets = batch[:, 1:].flatten()
            total += sliced_nll(model, hidden.flatten(0, 1), targets, HEAD_BYTES)
            count += targets.numel()
    model.to("cpu")
    return total / max(count, 1)


def split_held_out(ids: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(calibration rows, held-out rows): a random ``fraction`` of the windows (at least one) held out."""
    if ids.shape[0] < 2:
        raise ValueError(
            "a search (target_ratio, allocation 'search') needs at least 2 calibration windows (one is held out)"
        )
    order = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(seed))
    k = max(1, math.floor(ids.shape[0] * fraction))
    return ids[order[k:].sort().values], ids[order[:k].sort().values]


def search(
    model: nn.Module, adapter: ArchitectureAdapter, cfg: PruneConfig, ids: Tensor, held_out: Tensor
) -> tuple[Candidate, list[Candidate]]:
    """Measure every candidate of ``cfg.target_ratio`` (see the module docstring); returns the best and all."""
    from ..runtime.device import resolve_device, resolve_dtype
    from .pipeline import prune

    assert cfg.target_ratio is not None
    device = resolve_device(cfg.runtime.device)
    dtype = resolve_dtype(cfg.runtime.compute_dtype, device)
    measured = candidates(model, adapter, cfg.target_ratio)
    # candidates are compared at exact widths (equal parameter counts); the final run rounds the chosen
    # mix's width to cfg's multiple (64 for MLPs >= 1024 wide), which moves the count by < half a multiple
    # per layer: SmolLM2 at 30% of parameters, width 758 prefilled at 0.83x dense in llama.cpp
    fast = replace(
        cfg, target_ratio=None, width_multiple=1, solver=replace(cfg.solver, refit="ls"), allocation="uniform"
    )
    # the dense model's layer ranking is the same for every candidate: one probe pass, not one each
    angular = (
        angular_distances(model, adapter, ids, fast, device, dtype) if any(c.drop_layers for c in measured) else []
    )
    for candidate in measured:
        trial = copy.deepcopy(model)
        dropped = least_changing_layers(angular, candidate.drop_layers) if candidate.drop_layers else None
        prune(trial, config=candidate.config(fast), calibration_ids=ids, dropped_layers=dropped)
        candidate.held_out_loss = held_out_loss(trial, held_out, cfg.runtime.batch_size, device, dtype)
        log.info("budget candidate %s", asdict(candidate))
        del trial
    best = min(measured, key=lambda c: (c.held_out_loss, c.drop_layers))
    return best, measured


def frontier_record(best: Candidate, measured: list[Candidate], held_out_windows: int) -> dict[str, Any]:
    return {
        "chosen": asdict(best),
        "candidates": [asdict(c) for c in measured],
        "held_out_windows": held_out_windows,
        "search_recipe": "closed-form reconstruction (refit ls), uniform widths",
    }
