"""One decoder layer's MLP: statistics from its calibration inputs, solve, shrink, measure.

``prune_layer_mlp`` is what the pipeline calls per layer; ``collect_statistics`` runs a layer on all
calibration inputs and accumulates the MLP's least-squares statistics (also used by the probe)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters import ArchitectureAdapter
from ..config import PruneConfig
from ..core import MLPPruneResult, MLPStatistics, MLPWeights, SolverConfig, prune_mlp
from ..core.solver import finalize_down, least_squares_down, resolve_fit_bias
from ..runtime.device import phase_peak
from ..runtime.layerwise import AttentionCache, LayerInputs, compute_copy, run_layer
from . import distributed
from .context import LayerContext

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    """What happened to one decoder layer's MLP."""

    index: int
    width_before: int
    width_after: int
    kept: list[int]
    error: float  # ||y_pruned - y_dense||^2 / ||y_dense||^2 on all calibration tokens (compute dtype)
    error_ls: float | None  # same, from float64 statistics (token-weighted if so configured), after selection +
    # reconstruction (None for score rules, whose statistics hold no Gram matrix)
    error_refit: float | None = None  # same, after the final refit (None without one)
    refit_accepted: bool | None = None  # False: the refit was discarded (early stopping or safeguard)
    refit_first: float | None = None
    refit_last: float | None = None
    refit_rounds: int | None = None  # rounds the refit ran (early stopping may end it before refit_rounds)
    refit_holdout: list[float] = field(default_factory=list)  # relative held-out error: start, then each round
    seconds: dict[str, float] = field(default_factory=dict)
    # per phase, as ``seconds``: peak allocated GPU memory (CUDA), or tensor bytes under a TensorMeter
    gpu_peak_gib: dict[str, float] = field(default_factory=dict)
    kv_groups_kept: list[int] | None = None  # attention: KV groups kept (None: heads not pruned)
    query_heads_kept: list[int] | None = None  # attention, head_unit "query": query heads kept
    heads_error: float | None = None  # relative error of the attention output after head pruning


class _ErrorMeter:
    """Accumulates ||dense(x) - y||^2 and ||dense(x)||^2 over MLP inputs x and the pruned MLP's
    outputs y, as ``_capture_mlp`` records them for each batch (x, z, y)."""

    def __init__(self, dense: MLPWeights, captured: list[Tensor]) -> None:
        self.dense, self.captured = dense, captured
        self.num = 0.0
        self.den = 0.0

    def __call__(self, _batch: int, _output: Tensor) -> None:
        x, _z, y = self.captured
        self.captured.clear()
        x = x.reshape(-1, x.shape[-1])
        yd = self.dense(x).float()
        self.num += float((yd - y.reshape(yd.shape).float()).pow(2).sum())
        self.den += float(yd.pow(2).sum())

    @property
    def value(self) -> float:
        return self.num / max(self.den, 1e-30)


def prune_layer_mlp(
    ctx: LayerContext,
    layer: nn.Module,
    index: int,
    inputs: LayerInputs,
    k: int,
    dense_outputs: LayerInputs | None = None,
    removed_after: PerBatch | None = None,
) -> tuple[LayerReport, LayerInputs]:
    """Prune ``k`` of one layer's MLP neurons.  The targets are the dense MLP's outputs plus offsets:
    with ``removed_after(batch, h)`` (what removed layers that followed this one made of its output h,
    ``pruning.depth``) R(h) - h, so the MLP also carries what they added (every neuron kept and W_down
    refit when ``k`` is 0); with ``dense_outputs`` (the dense model's trajectory after this layer)
    beta * (dense output - R(h)), so the refit also absorbs error accumulated upstream.
    Records the layer's attention outputs in the first pass and replays them after (``AttentionCache``)."""
    adapter, cfg, device, dtype = ctx.adapter, ctx.cfg, ctx.device, ctx.dtype
    positions, holdout_mask = ctx.positions, ctx.holdout_mask
    width = adapter.mlp_width(layer)
    if k == 0 and removed_after is None:
        outputs = run_layer(compute_copy(layer, device, dtype), inputs, device, dtype)
        return LayerReport(index, width, width, list(range(width)), 0.0, 0.0), outputs

    dense = adapter.read_mlp(layer).to(device, torch.float32)
    offsets_first = offsets_again = weights_first = weights_again = None
    if dense_outputs is not None or removed_after is not None:
        beta = cfg.experimental.error_correction

        def offset(batch: int, out: Tensor) -> Tensor:
            after = out if removed_after is None else removed_after(batch, out)
            total = after.float() - out.float()
            if dense_outputs is not None:
                total += beta * (dense_outputs.hidden[batch].to(out.device, torch.float32) - after.float())
            return total

        offsets_first, offsets_again = _record_then_replay(offset)
    if cfg.experimental.token_weighting == "residual":
        weights_first, weights_again = _record_then_replay(lambda _batch, out: residual_token_weights(out))

    seconds: dict[str, float] = {}
    gpu: dict[str, float] = {}
    attention = AttentionCache()  # the first pass records the attention, later passes replay it
    t0 = time.perf_counter()
    with phase_peak(device, gpu, "statistics"):
        stats = collect_statistics(
            adapter,
            layer,
            inputs,
            device,
            dtype,
            dense,
            None,
            positions,
            offsets_first,
            weights_first,
            attention,
            full=cfg.solver.needs_gram or k == 0,
            matrix_dtype=cfg.solver.matrix_dtype,
        )
    seconds["attention"] = attention.seconds
    seconds["statistics"] = time.perf_counter() - t0 - attention.seconds
    sample_x, sample_offsets, sample_weights = stats.sample_inputs(), stats.sample_offsets(), stats.sample_weights()
    with phase_peak(device, gpu, "solve"):
        if k == 0:  # a repair only: every neuron kept, W_down to the offset targets
            result = on_rank0(lambda: refit_down(dense, stats, cfg.solver), dense, cfg)
        else:
            result = on_rank0(
                lambda: prune_mlp(
                    dense, stats, k, cfg.solver, sample_x, dtype, sample_offsets, sample_weights, holdout_mask
                ),
                dense,
                cfg,
            )
    del stats
    adapter.write_mlp(layer, result.weights)
    if result.needs_final_ls:  # W_up/W_gate changed on a sample: refit W_down on all tokens
        t0 = time.perf_counter()
        with phase_peak(device, gpu, "statistics"):
            stats = collect_statistics(
                adapter,
                layer,
                inputs,
                device,
                dtype,
                result.weights.to(device),
                dense,
                None,
                offsets_again,
                weights_again,
                attention,
                matrix_dtype=cfg.solver.matrix_dtype,
            )
        seconds["statistics"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        fit_bias = resolve_fit_bias(cfg.solver, dense)
        with phase_peak(device, gpu, "final_ls"):
            result = on_rank0(lambda: finalize_down(result, stats, cfg.solver, fit_bias), dense, cfg, result)
        if result.refit_accepted is False:
            log.info(
                "layer %d: the refit raised the calibration error (%.4g -> %.4g); kept the closed form",
                index,
                result.error_ls,
                result.error_refit,
            )
        adapter.write_mlp(layer, result.weights)
        del stats
        seconds["final_ls"] = time.perf_counter() - t0
    # the layer holds the new weights: free the solve's copies (device memory) before propagating
    result = replace(result, weights=result.weights.to("meta"), closed_form=None)

    t0 = time.perf_counter()
    work = compute_copy(layer, device, dtype)
    captured: list[Tensor] = []
    hooks = _capture_mlp(adapter, work, captured)
    meter = _ErrorMeter(dense.to(device, dtype), captured)
    try:
        with attention.use(adapter.attention_module(work), device), phase_peak(device, gpu, "propagate"):
            outputs = run_layer(work, inputs, device, dtype, on_output=meter)
    finally:
        for hook in hooks:
            hook.remove()
    meter.num, meter.den = distributed.all_reduce_sum([meter.num, meter.den])
    seconds["propagate"] = time.perf_counter() - t0
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
        refit_rounds=len(history) if result.refit_accepted is not None else None,
        refit_holdout=[round(e, 6) for e in result.refit_holdout],
        seconds={**result.seconds, **seconds},
        gpu_peak_gib=gpu,
    )
    return report, outputs


def refit_down(dense: MLPWeights, stats: MLPStatistics, cfg: SolverConfig) -> MLPPruneResult:
    """Every neuron kept, W_down (and its bias where fitted) the closed form for ``stats``' targets."""
    weights, error = least_squares_down(dense, stats, cfg, resolve_fit_bias(cfg, dense))
    return MLPPruneResult(weights, torch.arange(dense.width), error)


def collect_statistics(
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
    attention: AttentionCache | None = None,
    full: bool = True,
    matrix_dtype: torch.dtype = torch.float64,
) -> MLPStatistics:
    """Run ``layer`` on all calibration inputs and accumulate statistics of its MLP inputs.

    Activations z and targets y are computed in ``dtype`` (as the layer computes them), their
    products in float32.  ``offset_for(batch, layer_output)`` may return a per-token correction added
    to the targets, ``weight_for(batch, layer_output)`` per-token weights (B, S) of the least-squares
    terms.  ``attention``: record the layer's attention outputs on the first pass, replay them after.
    ``full`` False: diag(G) and the sums only (for score rules); ``matrix_dtype``: G's and C's.
    """
    stats = MLPStatistics(
        features.width,
        features.hidden_size,
        device,
        positions,
        activation_dtype=dtype,
        full=full,
        matrix_dtype=matrix_dtype,
    )
    features = features.to(device, dtype)
    target = None if target is None else target.to(device, dtype)
    work = compute_copy(layer, device, dtype)
    captured: list[Tensor] = []
    hooks = _capture_mlp(adapter, work, captured)

    def finish(batch: int, output: Tensor) -> None:
        offset = offset_for(batch, output) if offset_for is not None else None
        weight = weight_for(batch, output) if weight_for is not None else None
        x, z, y = captured
        captured.clear()
        stats.update(x, features, target, offset, weight, z=z, y=y)

    replay = nullcontext() if attention is None else attention.use(adapter.attention_module(work), device)
    try:
        with replay:
            run_layer(work, inputs, device, dtype, keep_outputs=False, on_output=finish)
    finally:
        for hook in hooks:
            hook.remove()
    distributed.all_reduce_statistics(stats)
    return stats


def _capture_mlp(adapter: ArchitectureAdapter, layer: nn.Module, captured: list[Tensor]) -> list[Any]:
    """Hooks appending, per forward of ``layer``, its MLP input x, intermediate z and output y (the
    down projection's input and output) to ``captured``; the caller removes them."""
    down = adapter.mlp_linears(layer)["down"]
    return [
        adapter.mlp_input_linear(layer).register_forward_pre_hook(lambda _m, args: captured.append(args[0])),
        down.register_forward_hook(lambda _m, args, out: captured.extend((args[0], out))),
    ]


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


def on_rank0(
    solve: Any, template: MLPWeights, cfg: PruneConfig, previous: MLPPruneResult | None = None
) -> MLPPruneResult:
    """Run ``solve`` on rank 0 only and broadcast its weights (identity without torch.distributed)."""
    if not distributed.active():
        return solve()
    result = solve() if distributed.rank() == 0 else None
    weights, kept = distributed.broadcast_weights(
        result.weights if result else None, template, result.kept if result else None
    )
    needs_final_ls = distributed.broadcast_object(result.needs_final_ls if result is not None else None)
    if result is not None:
        return result
    if previous is not None:  # second solve (final least squares): keep the first one's bookkeeping
        return MLPPruneResult(weights, previous.kept, float("nan"))
    return MLPPruneResult(weights, kept, float("nan"), needs_final_ls=needs_final_ls)
