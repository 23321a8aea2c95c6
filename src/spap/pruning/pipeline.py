"""Layer-by-layer pruning driver: calibration -> per-layer statistics -> solve -> shrink -> propagate."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from ..adapters import get_adapter
from ..config import PruneConfig
from ..core import NonFiniteStatisticsError, allocation
from ..core.stats import refit_token_positions
from ..io.calibration import calibration_tokens
from ..runtime.device import (
    peak_memory,
    release_host_memory,
    reset_peak_memory,
    resolve_device,
    resolve_dtype,
    versions,
)
from ..runtime.layerwise import Residency, ResidentLayers, capture_layer_inputs, compute_copy, run_layer
from ..runtime.spill import activation_bytes, spilling
from . import budget, distributed
from .allocation_search import search_allocation
from .context import LayerContext
from .depth import RemovedRun, drop_layers
from .heads import prune_layer_heads, query_heads_to_prune
from .mlp import LayerReport, prune_layer_mlp
from .probe import LayerProbe, allocate, probe_layers

__all__ = ["LayerReport", "PruneReport", "count_parameters", "prune"]

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    """Everything a run did; serialised as pruning.json next to the checkpoint."""

    config: dict[str, Any]
    model_type: str
    layers: list[LayerReport]
    calibration_shape: list[int]
    parameters_before: int
    parameters_after: int
    seconds: dict[str, float]
    memory: dict[str, float]
    versions: dict[str, str]
    device: str
    compute_dtype: str
    extra: dict[str, Any] = field(default_factory=dict)
    calibration_ids: Tensor | None = field(default=None, repr=False)  # (n, seq_len); not serialised

    @property
    def widths(self) -> list[int]:
        return [layer.width_after for layer in self.layers]

    def to_dict(self) -> dict[str, Any]:
        ids, self.calibration_ids = self.calibration_ids, None
        try:
            out = asdict(self)
        finally:
            self.calibration_ids = ids
        del out["calibration_ids"]
        out["widths"] = self.widths
        return out


def _warn_unaligned(kept_widths: list[int], multiple: int = 8) -> None:
    """GEMMs with an inner dimension that is not a multiple of 8 miss the fast paths: on an H100 an
    8B-shaped model with 30% of its neurons removed (10,035 kept) ran slower than dense, and llama.cpp
    prefilled SmolLM2 at width 1075 at 0.70x the dense speed (1.18x at 1088)."""
    odd = sorted({w for w in kept_widths if w % multiple})
    if odd:
        log.warning(
            "kept MLP widths %s are not multiples of %d; on GPUs and in llama.cpp such widths can make the "
            "pruned model slower than the dense one. Use --width-multiple 64 (PruneConfig.width_multiple) to serve it.",
            odd[:4],
            multiple,
        )


def _allocation_record(counts: list[int], probe: list[LayerProbe]) -> dict[str, Any]:
    record: dict[str, Any] = {"counts": counts, "angular_distances": [p.angular for p in probe]}
    if probe[0].energy is not None:
        record["energies"] = [p.energy for p in probe]
    return record


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune(
    model: nn.Module,
    tokenizer: Any = None,
    config: PruneConfig | None = None,
    calibration_ids: Tensor | None = None,
    n_prune: list[int] | None = None,
    residency: Residency | None = None,
    dropped_layers: list[int] | None = None,
) -> PruneReport:
    """Prune ``model``'s MLP neurons in place, layer by layer, and return a report.

    ``calibration_ids`` (n, seq_len) overrides ``config.calibration``; ``n_prune`` (one count per layer)
    overrides ``config.allocation``; ``dropped_layers`` (indices) which ``config.drop_layers`` layers go.
    ``residency`` (default ``ResidentLayers``: all weights in memory) materialises and releases layers
    around their use: ``offload.StreamedLayers`` for a skeleton model.
    """
    cfg = config or PruneConfig()
    get_adapter(model)  # an unsupported architecture fails here, before any sizing
    shape = tuple(calibration_ids.shape) if calibration_ids is not None else None
    n, seq_len = shape or (cfg.calibration.n_samples, cfg.calibration.seq_len)
    dtype = resolve_dtype(cfg.runtime.compute_dtype, resolve_device(cfg.runtime.device))
    first, last = distributed.shard_bounds(n)  # data parallel: this rank's sequences
    needed = activation_bytes(last - first, seq_len, _hidden_size(model), dtype)
    spill = cfg.runtime.max_host_memory_gib is not None and needed > cfg.runtime.max_host_memory_gib * 2**30 / 2
    if spill:
        log.info("calibration activations (%.2f GiB) go to disk: over half of --max-host-memory", needed / 2**30)
    searched: tuple[str, str, dict[str, Any], float] | None = None  # report keys (extra, seconds), record, seconds
    if cfg.target_ratio is not None or (cfg.allocation == "search" and n_prune is None):
        if residency is not None and not isinstance(residency, ResidentLayers):
            what = "target_ratio" if cfg.target_ratio is not None else "allocation 'search'"
            raise ValueError(f"{what} needs the whole model in memory; out-of-core pruning does not search")
        started = time.perf_counter()
        ids, held_out = _held_out_windows(model, tokenizer, cfg, calibration_ids)
        if cfg.target_ratio is not None:
            cfg, frontier = _search_budget(model, cfg, ids, held_out)
            searched = "budget", "budget_search", frontier, time.perf_counter() - started
        else:
            rule, record = search_allocation(model, cfg, ids, held_out)
            log.info("allocation: %s (lowest held-out loss)", rule)
            cfg = replace(cfg, allocation=rule)
            searched = "allocation_search", "allocation_search", record, time.perf_counter() - started
        calibration_ids = ids
    with spilling() if spill else nullcontext():
        report = _prune(model, tokenizer, cfg, calibration_ids, n_prune, residency or ResidentLayers(), dropped_layers)
    report.extra["activations_spilled"] = spill
    if searched is not None:
        extra_key, seconds_key, record, seconds = searched
        report.extra[extra_key] = record
        report.seconds[seconds_key] = seconds  # the candidates' pruning and scoring
        report.seconds["total"] += seconds
    return report


def _held_out_windows(
    model: nn.Module, tokenizer: Any, cfg: PruneConfig, calibration_ids: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(calibration windows, windows held out from them for a search): a quarter more windows than
    ``cfg.calibration.n_samples`` are drawn, so the pruning itself keeps its n_samples; given
    ``calibration_ids`` are split as they are."""
    if calibration_ids is None:
        if tokenizer is None:
            raise ValueError("pass a tokenizer or calibration_ids")
        n = cfg.calibration.n_samples
        extra = replace(cfg.calibration, n_samples=n + max(1, n // 4))
        device = resolve_device(cfg.runtime.device)
        calibration_ids = calibration_tokens(
            tokenizer, extra, model, resolve_dtype(cfg.runtime.compute_dtype, device), device
        )
    return budget.split_held_out(calibration_ids, 0.2, cfg.seed)


def _search_budget(
    model: nn.Module, cfg: PruneConfig, ids: Tensor, held_out: Tensor
) -> tuple[PruneConfig, dict[str, Any]]:
    """The config with ``sparsity`` and ``drop_layers`` that ``budget.search`` chose for
    ``cfg.target_ratio``, and the frontier record."""
    best, measured = budget.search(model, get_adapter(model), cfg, ids, held_out)
    log.info(
        "budget: removing %d layers, %d KV groups per layer and %.1f%% of MLP neurons",
        best.drop_layers,
        best.kv_groups_removed,
        100 * best.sparsity,
    )
    return best.config(cfg), budget.frontier_record(best, measured, held_out.shape[0])


def _hidden_size(model: nn.Module) -> int:
    config: Any = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.hidden_size)


def _prune(
    model: nn.Module,
    tokenizer: Any,
    cfg: PruneConfig,
    calibration_ids: Tensor | None,
    n_prune: list[int] | None,
    residency: Residency,
    dropped_layers: list[int] | None = None,
) -> PruneReport:
    t_start = time.perf_counter()
    adapter = get_adapter(model)
    device = resolve_device(cfg.runtime.device)
    dtype = resolve_dtype(cfg.runtime.compute_dtype, device)
    reset_peak_memory(device)
    layers = adapter.decoder_layers(model)
    widths = [adapter.mlp_width(layer) for layer in layers]
    params_before = count_parameters(model)
    if cfg.prunes_heads and cfg.head_unit == "query":  # refuse a useless head_sparsity before any work
        query_heads_to_prune(cfg.head_sparsity, *adapter.attention_shape(layers[0])[:2])
    was_training = model.training
    model.eval()

    t0 = time.perf_counter()
    if calibration_ids is None:
        if tokenizer is None:
            raise ValueError("pass a tokenizer or calibration_ids")
        calibration_ids = calibration_tokens(tokenizer, cfg.calibration, model, dtype, device)
    seconds = {"calibration_data": time.perf_counter() - t0}
    depth: dict[str, Any] | None = None
    removed_runs: dict[int, RemovedRun] = {}
    if cfg.drop_layers:
        if not isinstance(residency, ResidentLayers):
            raise ValueError("drop_layers needs the whole model in memory; out-of-core pruning does not remove layers")
        t0 = time.perf_counter()
        depth, removed_runs = drop_layers(model, adapter, calibration_ids, cfg, device, dtype, dropped_layers)
        layers = adapter.decoder_layers(model)
        widths = [adapter.mlp_width(layer) for layer in layers]
        seconds["depth"] = time.perf_counter() - t0
        log.info("removed decoder layers %s of %d", depth["dropped"], depth["layers_before"])
    probe: list[LayerProbe] = []
    # counts given by the caller are kept exact unless a multiple is asked for explicitly
    multiple = cfg.width_multiple_for(widths) if n_prune is None else (cfg.width_multiple or 1)
    if n_prune is not None:
        counts = list(n_prune)
    elif cfg.allocation_rule == "uniform":
        counts = allocation.uniform(widths, cfg.sparsity, multiple)
    else:
        t0 = time.perf_counter()
        probe = probe_layers(model, adapter, calibration_ids, cfg, device, dtype, residency)
        counts = allocate(cfg, widths, probe)
        seconds["probe"] = time.perf_counter() - t0
    if n_prune is not None or cfg.allocation_rule != "uniform":
        counts = allocation.round_kept_to_multiple(widths, counts, multiple)
    if not cfg.prunes_mlp:
        counts = [0] * len(widths)
    if len(counts) != len(layers) or any(not 0 <= k < m for k, m in zip(counts, widths)):
        raise ValueError(f"invalid per-layer prune counts {counts} for widths {widths}")
    _warn_unaligned([m - k for k, m in zip(counts, widths) if k])
    t0 = time.perf_counter()
    first, last = distributed.shard_bounds(calibration_ids.shape[0])  # data parallel: this rank's sequences
    with residency.capture():
        inputs = capture_layer_inputs(model, layers, calibration_ids[first:last], cfg.runtime.batch_size, device, dtype)
    seconds["capture"] = time.perf_counter() - t0
    positions = holdout_mask = None
    if cfg.solver.needs_sample:
        seq_len = calibration_ids.shape[1]
        positions, holdout_mask = refit_token_positions(
            calibration_ids.numel(), cfg.solver.refit_tokens, cfg.solver.holdout_tokens, cfg.seed
        )
        positions = distributed.local_positions(positions, first * seq_len, last * seq_len)

    for option, used in (
        ("error_correction", cfg.experimental.error_correction > 0),
        ("token_weighting", cfg.experimental.token_weighting != "none"),
    ):
        if used and not adapter.mlp_output_is_residual(model):
            raise ValueError(f"{option} needs layers whose MLP output is added last; {_model_type(model)} is not")
    ctx = LayerContext(adapter, cfg, device, dtype, positions, holdout_mask)
    dense_inputs = inputs if cfg.experimental.error_correction > 0 else None
    reports: list[LayerReport] = []
    bar = tqdm(list(enumerate(layers)), desc=f"{cfg.solver.method} {cfg.sparsity:.0%}", unit="layer")
    for index, layer in bar:
        t_layer = time.perf_counter()
        residency.load(index)
        load_seconds = time.perf_counter() - t_layer
        try:
            dense_outputs = None
            removed = removed_runs.get(index)
            if dense_inputs is not None:  # the dense model's trajectory, for error correction
                dense_outputs = run_layer(compute_copy(layer, device, dtype), dense_inputs, device, dtype)
                if removed is not None:
                    hidden = [removed(b, h.to(device)).to("cpu", dtype) for b, h in enumerate(dense_outputs.hidden)]
                    dense_outputs = replace(dense_outputs, hidden=hidden)
            head_report = None
            if cfg.prunes_heads:
                head_report = prune_layer_heads(ctx, layer, inputs)
            report, inputs = prune_layer_mlp(ctx, layer, index, inputs, counts[index], dense_outputs, removed)
            dense_inputs = dense_outputs
            if head_report is not None:
                kept_heads, report.heads_error = head_report
                if cfg.head_unit == "query":
                    report.query_heads_kept = kept_heads
                else:
                    report.kv_groups_kept = kept_heads
        except NonFiniteStatisticsError as exc:
            raise NonFiniteStatisticsError(f"layer {index}: {exc}") from exc
        t0 = time.perf_counter()
        residency.release(index, write=distributed.rank() == 0)
        release_host_memory()
        report.seconds["load"] = load_seconds
        report.seconds["release"] = time.perf_counter() - t0
        report.seconds["total"] = time.perf_counter() - t_layer
        reports.append(report)
        bar.set_postfix(width=report.width_after, rel_err=f"{report.error:.2e}")
    model.train(was_training)
    seconds["total"] = time.perf_counter() - t_start
    return PruneReport(
        config=cfg.to_dict(),
        model_type=_model_type(model),
        layers=reports,
        calibration_shape=list(calibration_ids.shape),
        parameters_before=params_before,
        parameters_after=count_parameters(model),
        seconds=seconds,
        memory=peak_memory(device),
        versions=versions(),
        device=str(device),
        compute_dtype=str(dtype).replace("torch.", ""),
        extra={
            **({"allocation": _allocation_record(counts, probe)} if probe else {}),
            **({"depth": depth} if depth else {}),
        },
        calibration_ids=calibration_ids,
    )


def _model_type(model: nn.Module) -> str:
    config: Any = model.config
    return str(config.model_type)
