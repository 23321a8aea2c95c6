"""Dense-model probe for global sparsity allocation (FLAP ranking, StructPrune energies, CFSP angles)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..adapters import ArchitectureAdapter
from ..config import PruneConfig
from ..core import allocation
from ..core.linalg import QuadraticLS
from ..core.scores import neuron_scores
from ..core.selection import score_select
from ..runtime.device import release_host_memory
from ..runtime.layerwise import Residency, ResidentLayers, capture_layer_inputs, compute_copy, run_layer
from .mlp import collect_statistics


@dataclass
class LayerProbe:
    """Dense-model summary of one layer for global allocation (statistics-based fields only when needed)."""

    angular: float  # mean over tokens of arccos(cos(h_in, h_out)) / pi of the whole decoder block
    flap_scores: Tensor | None = None  # (m,) FLAP fluctuation scores
    energy: float | None = None  # ||y - y_hat||^2 / ||h||^2 at the target sparsity (one-shot selection + LS)


def mean_angular_distance(before: list[Tensor], after: list[Tensor]) -> float:
    """mean_n arccos(cos(a_n, b_n)) / pi over all tokens of per-batch hidden states (B, S, d); a token
    with a zero vector counts as cos = 0.5, as in CFSP's reference."""
    total, count = 0.0, 0
    for a, b in zip(before, after):
        cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=0.0).nan_to_num(nan=0.5)
        total += float(torch.arccos(cos.clamp(-1, 1)).sum()) / torch.pi
        count += cos.numel()
    return total / max(count, 1)


def probe_layers(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    ids: Tensor,
    cfg: PruneConfig,
    device: torch.device,
    dtype: torch.dtype,
    residency: Residency | None = None,
) -> list[LayerProbe]:
    """One dense pass, one layer in memory at a time: per-layer angular distance and, for the rules that
    use them ("global", "structprune"), FLAP scores and the pruning energy. ``residency``: see
    ``pipeline.prune`` (each layer is loaded, probed and released unchanged)."""
    residency = residency or ResidentLayers()
    layers = adapter.decoder_layers(model)
    with residency.capture():
        inputs = capture_layer_inputs(model, layers, ids, cfg.runtime.batch_size, device, dtype)
    needs_statistics = cfg.allocation_rule in ("global", "structprune")
    probes = []
    for index, layer in enumerate(tqdm(layers, desc="probe", unit="layer")):
        residency.load(index)
        scores = error = None
        if needs_statistics:
            dense = adapter.read_mlp(layer).to(device, torch.float32)
            energy_needed = cfg.allocation_rule == "structprune"  # FLAP's ranking needs diag(G) only
            stats = collect_statistics(adapter, layer, inputs, device, dtype, dense, None, None, full=energy_needed)
            if energy_needed:
                k = max(1, int(round(cfg.sparsity * dense.width)))
                problem = QuadraticLS.from_stats(stats)
                pruned = score_select(problem, k, cfg.solver)
                sub = problem.restrict(torch.nonzero(~pruned).flatten())
                w, _ = sub.solve(cfg.solver.damping * problem.mean_diag)
                error = 2 * sub.objective(w)
                del problem, sub
            scores = neuron_scores("flap", dense.down, stats).cpu()
            del stats
        outputs = run_layer(compute_copy(layer, device, dtype), inputs, device, dtype)
        angular = mean_angular_distance(inputs.hidden, outputs.hidden)
        inputs = outputs
        energy = None
        if error is not None:
            energy = error / max(sum(float(h.float().pow(2).sum()) for h in inputs.hidden), 1e-30)
        probes.append(LayerProbe(angular, scores, energy))
        residency.release(index, write=False)
        release_host_memory()
    return probes


T = TypeVar("T")


def allocate(cfg: PruneConfig, widths: list[int], probe: list[LayerProbe]) -> list[int]:
    """Per-layer prune counts for a global allocation rule."""
    if cfg.allocation_rule == "global":
        return allocation.global_ranking(
            [_required(p.flap_scores) for p in probe], cfg.sparsity, cfg.min_sparsity, cfg.max_sparsity
        )
    if cfg.allocation_rule == "structprune":
        return allocation.energy_softmax(
            widths,
            [_required(p.energy) for p in probe],
            cfg.sparsity,
            cfg.temperature,
            cfg.min_sparsity,
            cfg.max_sparsity,
        )
    if cfg.allocation_rule == "angular":
        return allocation.angular_sigmoid(
            widths, [p.angular for p in probe], cfg.sparsity, cfg.angular_slope, cfg.min_sparsity, cfg.max_sparsity
        )
    raise ValueError(f"unknown allocation {cfg.allocation!r}")


def _required(value: T | None) -> T:
    """A probe field the chosen allocation rule computed (``probe_layers`` fills what it needs)."""
    assert value is not None
    return value
