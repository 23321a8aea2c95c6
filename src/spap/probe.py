"""Dense-model probe for global sparsity allocation (FLAP ranking, StructPrune energies)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .adapters import ArchitectureAdapter
from .config import PruneConfig
from .core import allocation
from .core.linalg import QuadraticLS
from .core.scores import neuron_scores
from .core.selection import score_select
from .layer_mlp import collect_statistics
from .layerwise import capture_layer_inputs, compute_copy, run_layer
from .runtime import release_host_memory


@dataclass
class LayerProbe:
    """Dense-model summary of one layer for global allocation."""

    flap_scores: Tensor  # (m,) FLAP fluctuation scores
    energy: float  # ||y - y_hat||^2 / ||h||^2 at the target sparsity (one-shot selection + LS)


def probe_layers(
    model: nn.Module, adapter: ArchitectureAdapter, ids: Tensor, cfg: PruneConfig, device: torch.device, dtype: torch.dtype
) -> list[LayerProbe]:
    """One dense pass, one layer in memory at a time: per-layer scores and pruning energy."""
    layers = adapter.decoder_layers(model)
    inputs = capture_layer_inputs(model, layers, ids, cfg.batch_size, device, dtype)
    probes = []
    for layer in tqdm(layers, desc="probe", unit="layer"):
        dense = adapter.read_mlp(layer).to(device, torch.float32)
        stats = collect_statistics(adapter, layer, inputs, device, dtype, dense, None, None)
        k = max(1, int(round(cfg.sparsity * dense.width)))
        problem = QuadraticLS.from_stats(stats)
        pruned = score_select(problem, k, cfg.solver)
        keep = torch.nonzero(~pruned).flatten()
        sub = problem.restrict(keep)
        w, _ = sub.solve(cfg.solver.damping * problem.mean_diag)
        error = 2 * sub.objective(w)
        inputs = run_layer(compute_copy(layer, device, dtype), inputs, device, dtype)
        hidden = sum(float(h.float().pow(2).sum()) for h in inputs.hidden)
        probes.append(LayerProbe(neuron_scores("flap", dense.down, stats).cpu(), error / max(hidden, 1e-30)))
        del stats, problem, sub
        release_host_memory()
    return probes


def allocate(cfg: PruneConfig, widths: list[int], probe: list[LayerProbe]) -> list[int]:
    """Per-layer prune counts for a global allocation rule."""
    if cfg.allocation_rule == "global":
        return allocation.global_ranking([p.flap_scores for p in probe], cfg.sparsity, cfg.min_sparsity, cfg.max_sparsity)
    if cfg.allocation_rule == "structprune":
        return allocation.energy_softmax(
            widths, [p.energy for p in probe], cfg.sparsity, cfg.temperature, cfg.min_sparsity, cfg.max_sparsity
        )
    raise ValueError(f"unknown allocation {cfg.allocation!r}")
