"""Layer-by-layer pruning driver: calibration -> per-layer statistics -> solve -> shrink -> propagate."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed
from .adapters import ArchitectureAdapter, get_adapter
from .calibration import calibration_tokens
from .config import PruneConfig
from .core import MLPPruneResult, MLPStatistics, MLPWeights, NonFiniteStatisticsError, prune_mlp
from .core.solver import finalize_down, resolve_fit_bias
from .core import allocation
from .core.linalg import QuadraticLS
from .core.scores import neuron_scores
from .core.selection import score_select
from .core.heads import column_groups, prune_kv_groups
from .core.stats import sample_token_positions
from .layerwise import LayerInputs, capture_layer_inputs, compute_copy, run_layer
from .runtime import peak_memory, release_host_memory, reset_peak_memory, resolve_device, resolve_dtype, versions

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    """What happened to one decoder layer's MLP."""

    index: int
    width_before: int
    width_after: int
    kept: list[int]
    error: float  # ||y_pruned - y_dense||^2 / ||y_dense||^2 on all calibration tokens (compute dtype)
    error_ls: float  # same, from float64 statistics (token-weighted if so configured), after selection + LS
    error_refit: float | None = None  # same, after the final refit (None without one)
    refit_accepted: bool | None = None  # False: the refit did not lower error_ls and was discarded
    refit_first: float | None = None
    refit_last: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    kv_groups_kept: list[int] | None = None  # attention: KV groups kept (None: heads not pruned)
    heads_error: float | None = None  # relative error of the attention output after head pruning


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


class _ErrorMeter:
    """Accumulates ||dense(x) - pruned(x)||^2 and ||dense(x)||^2 over MLP inputs x."""

    def __init__(self, dense: MLPWeights, pruned: MLPWeights) -> None:
        self.dense, self.pruned = dense, pruned
        self.num = 0.0
        self.den = 0.0

    def __call__(self, _module: nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])
        yd = self.dense(x).float()
        self.num += float((yd - self.pruned(x).float()).pow(2).sum())
        self.den += float(yd.pow(2).sum())

    @property
    def value(self) -> float:
        return self.num / max(self.den, 1e-30)


def _warn_unaligned(kept_widths: list[int], multiple: int = 8) -> None:
    """GPU GEMMs with an inner dimension that is not a multiple of 8 miss the tensor-core paths: on an
    H100 an 8B-shaped model with 30% of its neurons removed (10,035 kept) ran slower than dense."""
    odd = sorted({w for w in kept_widths if w % multiple})
    if odd:
        log.warning(
            "kept MLP widths %s are not multiples of %d; on GPUs such widths can make the pruned model "
            "slower than the dense one. Use --width-multiple 64 (PruneConfig.width_multiple) for GPU deployment.",
            odd[:4], multiple,
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune(
    model: nn.Module,
    tokenizer: Any = None,
    config: PruneConfig | None = None,
    calibration_ids: Tensor | None = None,
    n_prune: list[int] | None = None,
) -> PruneReport:
    """Prune ``model``'s MLP neurons in place, layer by layer, and return a report.

    ``calibration_ids`` (n, seq_len) overrides ``config.calibration``; ``n_prune`` (one count per layer)
    overrides ``config.allocation``.
    """
    cfg = config or PruneConfig()
    t_start = time.perf_counter()
    adapter = get_adapter(model)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.compute_dtype, device)
    reset_peak_memory(device)
    layers = adapter.decoder_layers(model)
    widths = [adapter.mlp_width(layer) for layer in layers]
    params_before = count_parameters(model)
    was_training = model.training
    model.eval()

    t0 = time.perf_counter()
    if calibration_ids is None:
        if tokenizer is None:
            raise ValueError("pass a tokenizer or calibration_ids")
        calibration_ids = calibration_tokens(tokenizer, cfg.calibration, model, dtype, device)
    seconds = {"calibration_data": time.perf_counter() - t0}
    probe: list[LayerProbe] = []
    if n_prune is not None:
        counts = list(n_prune)
    elif cfg.allocation_rule == "uniform":
        counts = allocation.uniform(widths, cfg.sparsity, cfg.width_multiple)
    else:
        t0 = time.perf_counter()
        probe = probe_layers(model, adapter, calibration_ids, cfg, device, dtype)
        counts = allocate(cfg, widths, probe)
        seconds["probe"] = time.perf_counter() - t0
    if n_prune is not None or cfg.allocation_rule != "uniform":
        counts = allocation.round_kept_to_multiple(widths, counts, cfg.width_multiple)
    if not cfg.prunes_mlp:
        counts = [0] * len(widths)
    if len(counts) != len(layers) or any(not 0 <= k < m for k, m in zip(counts, widths)):
        raise ValueError(f"invalid per-layer prune counts {counts} for widths {widths}")
    _warn_unaligned([m - k for k, m in zip(counts, widths) if k])
    t0 = time.perf_counter()
    first, last = distributed.shard_bounds(calibration_ids.shape[0])  # data parallel: this rank's sequences
    inputs = capture_layer_inputs(model, layers, calibration_ids[first:last], cfg.batch_size, device, dtype)
    seconds["capture"] = time.perf_counter() - t0
    positions = None
    if cfg.solver.needs_sample:
        seq_len = calibration_ids.shape[1]
        positions = sample_token_positions(calibration_ids.numel(), cfg.solver.refit_tokens, cfg.seed)
        positions = distributed.local_positions(positions, first * seq_len, last * seq_len)

    for option, used in (("error_correction", cfg.error_correction > 0), ("token_weighting", cfg.token_weighting != "none")):
        if used and not adapter.mlp_output_is_residual(model):
            raise ValueError(f"{option} needs layers whose MLP output is added last; {model.config.model_type} is not")
    dense_inputs = inputs if cfg.error_correction > 0 else None
    reports: list[LayerReport] = []
    bar = tqdm(list(enumerate(layers)), desc=f"{cfg.solver.method} {cfg.sparsity:.0%}", unit="layer")
    for index, layer in bar:
        t_layer = time.perf_counter()
        try:
            dense_outputs = None
            if dense_inputs is not None:  # the dense model's trajectory, for error correction
                dense_outputs = run_layer(compute_copy(layer, device, dtype), dense_inputs, device, dtype)
            head_report = None
            if cfg.prunes_heads:
                head_report = _prune_heads(model, adapter, layer, index, inputs, cfg, device, dtype)
            report, inputs = _prune_layer(
                adapter, layer, index, inputs, counts[index], cfg, device, dtype, positions, dense_outputs
            )
            dense_inputs = dense_outputs
            if head_report is not None:
                report.kv_groups_kept, report.heads_error = head_report
        except NonFiniteStatisticsError as exc:
            raise NonFiniteStatisticsError(f"layer {index}: {exc}") from exc
        release_host_memory()
        report.seconds["total"] = time.perf_counter() - t_layer
        reports.append(report)
        bar.set_postfix(width=report.width_after, rel_err=f"{report.error:.2e}")
    model.train(was_training)
    seconds["total"] = time.perf_counter() - t_start
    return PruneReport(
        config=cfg.to_dict(),
        model_type=model.config.model_type,
        layers=reports,
        calibration_shape=list(calibration_ids.shape),
        parameters_before=params_before,
        parameters_after=count_parameters(model),
        seconds=seconds,
        memory=peak_memory(device),
        versions=versions(),
        device=str(device),
        compute_dtype=str(dtype).replace("torch.", ""),
        extra={"allocation": {"counts": counts, "energies": [p.energy for p in probe]}} if probe else {},
        calibration_ids=calibration_ids,
    )


def _prune_layer(
    adapter: ArchitectureAdapter,
    layer: nn.Module,
    index: int,
    inputs: LayerInputs,
    k: int,
    cfg: PruneConfig,
    device: torch.device,
    dtype: torch.dtype,
    positions: Tensor | None,
    dense_outputs: LayerInputs | None = None,
) -> tuple[LayerReport, LayerInputs]:
    """Prune one layer's MLP.  With ``dense_outputs`` (the dense model's outputs of this layer) the
    targets are corrected by beta * (dense output - output of the layer with its dense MLP on the
    pruned model's inputs), so the refit also absorbs error accumulated upstream."""
    width = adapter.mlp_width(layer)
    if k == 0:
        outputs = run_layer(compute_copy(layer, device, dtype), inputs, device, dtype)
        return LayerReport(index, width, width, list(range(width)), 0.0, 0.0), outputs

    dense = adapter.read_mlp(layer).to(device, torch.float32)
    offsets_first = offsets_again = weights_first = weights_again = None
    if dense_outputs is not None:
        beta = cfg.error_correction
        offsets_first, offsets_again = _record_then_replay(
            lambda batch, out: beta * (dense_outputs.hidden[batch].to(out.device, torch.float32) - out.float())
        )
    if cfg.token_weighting == "residual":
        weights_first, weights_again = _record_then_replay(lambda _batch, out: residual_token_weights(out))

    stats = _collect(adapter, layer, inputs, device, dtype, dense, None, positions, offsets_first, weights_first)
    sample_x, sample_offsets, sample_weights = stats.sample_inputs(), stats.sample_offsets(), stats.sample_weights()
    result = _on_rank0(
        lambda: prune_mlp(dense, stats, k, cfg.solver, sample_x, dtype, sample_offsets, sample_weights), dense, cfg
    )
    del stats
    adapter.write_mlp(layer, result.weights)
    if result.needs_final_ls:  # W_up/W_gate changed on a sample: refit W_down on all tokens
        stats = _collect(
            adapter, layer, inputs, device, dtype, result.weights.to(device), dense, None, offsets_again, weights_again
        )
        fit_bias = resolve_fit_bias(cfg.solver, dense)
        result = _on_rank0(lambda: finalize_down(result, stats, cfg.solver, fit_bias), dense, cfg, result)
        if result.refit_accepted is False:
            log.info("layer %d: the refit raised the calibration error (%.4g -> %.4g); kept the closed form",
                     index, result.error_ls, result.error_refit)
        adapter.write_mlp(layer, result.weights)
        del stats

    work = compute_copy(layer, device, dtype)
    meter = _ErrorMeter(dense.to(device, dtype), result.weights.to(device, dtype))
    handle = adapter.mlp_input_linear(work).register_forward_pre_hook(meter)
    try:
        outputs = run_layer(work, inputs, device, dtype)
    finally:
        handle.remove()
    meter.num, meter.den = distributed.all_reduce_sum([meter.num, meter.den])
    history = result.refit_history
    report = LayerReport(
        index=index,
        width_before=width,
        width_after=result.weights.width,
        kept=result.kept.tolist(),
        error=meter.value,
        error_ls=result.error_ls,
        error_refit=result.error_refit,
        refit_accepted=result.refit_accepted,
        refit_first=history[0] if history else None,
        refit_last=history[-1] if history else None,
        seconds=dict(result.seconds),
    )
    return report, outputs


def _prune_heads(
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


def _collect(
    adapter: ArchitectureAdapter,
    layer: nn.Module,
    inputs: LayerInputs,
    device: torch.device,
    dtype: torch.dtype,
    features: MLPWeights,
    target: MLPWeights | None,
    positions: Tensor | None,
    offset_for: Callable[[int, Tensor], Tensor | None] | None = None,
    weight_for: Callable[[int, Tensor], Tensor | None] | None = None,
) -> MLPStatistics:
    """Run ``layer`` on all calibration inputs and accumulate statistics of its MLP inputs.

    ``offset_for(batch, layer_output)`` may return a per-token correction added to the targets,
    ``weight_for(batch, layer_output)`` per-token weights (B, S) of the least-squares terms.
    """
    stats = MLPStatistics(features.width, features.hidden_size, device, positions)
    work = compute_copy(layer, device, dtype)
    captured: list[Tensor] = []
    hook = adapter.mlp_input_linear(work).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))

    def finish(batch: int, output: Tensor) -> None:
        offset = offset_for(batch, output) if offset_for is not None else None
        weight = weight_for(batch, output) if weight_for is not None else None
        stats.update(captured.pop(), features, target, offset, weight)

    try:
        run_layer(work, inputs, device, dtype, keep_outputs=False, on_output=finish)
    finally:
        hook.remove()
    distributed.all_reduce_statistics(stats)
    return stats


PerBatch = Callable[[int, Tensor], Tensor]


def _record_then_replay(compute: PerBatch) -> tuple[PerBatch, PerBatch]:
    """Callbacks for two passes over the calibration batches: the first computes ``compute(batch,
    layer_output)`` and keeps it, the second returns the kept value of the same batch."""
    kept: list[Tensor] = []

    def first(batch: int, output: Tensor) -> Tensor:
        kept.append(compute(batch, output))
        return kept[-1]

    return first, lambda batch, _output: kept[batch]


def residual_token_weights(layer_output: Tensor) -> Tensor:
    """w_n = 1 / mean_j h_nj^2 for the layer's output residual stream h (B, S, d) -> (B, S), float32.

    Every consumer of the residual stream normalises it per token (the next layer's RMSNorm/LayerNorm,
    the final norm), so an MLP error e_n matters through ||e_n|| / ||h_n||; weighting the squared
    error by 1 / ||h_n||^2 stops the few tokens with massive activations from dominating the fit."""
    ms = layer_output.float().pow(2).mean(-1)
    return 1.0 / ms.clamp_min(torch.finfo(torch.float32).tiny)


def _on_rank0(
    solve: Any, template: MLPWeights, cfg: PruneConfig, previous: MLPPruneResult | None = None
) -> MLPPruneResult:
    """Run ``solve`` on rank 0 only and broadcast its weights (identity without torch.distributed)."""
    if not distributed.active():
        return solve()
    result = solve() if distributed.rank() == 0 else None
    weights, kept = distributed.broadcast_weights(
        result.weights if result else None, template, result.kept if result else None
    )
    if result is not None:
        return result
    if previous is not None:  # second solve (final least squares): keep the first one's bookkeeping
        return MLPPruneResult(weights, previous.kept, float("nan"))
    return MLPPruneResult(weights, kept, float("nan"), needs_final_ls=cfg.solver.needs_sample)


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
        stats = _collect(adapter, layer, inputs, device, dtype, dense, None, None)
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
