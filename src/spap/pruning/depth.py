"""Depth pruning: remove whole decoder layers, the ones that change the hidden state least, and repair
the gap each removed run of layers leaves by closed-form least squares.

A block's change is the mean over calibration tokens of the angular distance arccos(cos(h_in,
h_out)) / pi between its input and output hidden states (ShortGPT's block influence 1 - cos ranks
tokens the same way), measured on the dense model in one pass with one layer in memory at a time.
The ``n`` blocks of least change are removed; the width pass that follows calibrates on the
shallower model, so each remaining layer is reconstructed for the inputs it now receives.

Repair: a run R of removed layers that follows kept layer p changed p's output h into R(h). Where p's
MLP output is added last (h = r + W_down z), the target of p's MLP becomes W_down z + (R(h) - h): the
MLP absorbs, as well as a linear map of its own activations z can, what R added, on the inputs p now
receives. It is the width pass's own closed form (W_down = C G^-1, every neuron kept where p's width
is not pruned), with the removed layers run once per calibration batch. A run before the first kept
layer has no such predecessor and stays unrepaired.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters import ArchitectureAdapter
from ..config import PruneConfig
from ..runtime.layerwise import capture_layer_inputs, compute_copy, forward_batch
from . import distributed
from .probe import probe_layers


def least_changing_layers(angular: list[float], n: int) -> list[int]:
    """Indices (ascending) of the ``n`` layers with the smallest angular distance; ties by index."""
    if not 0 <= n < len(angular):
        raise ValueError(f"drop_layers must be in [0, {len(angular)}) for a model of {len(angular)} layers, got {n}")
    return sorted(sorted(range(len(angular)), key=lambda i: (angular[i], i))[:n])


def angular_distances(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    ids: Tensor,
    cfg: PruneConfig,
    device: torch.device,
    dtype: torch.dtype,
) -> list[float]:
    """Each decoder layer's mean angular distance between its input and output on ``ids``, from one
    dense probe pass (no allocation statistics)."""
    probe = probe_layers(model, adapter, ids, replace(cfg, allocation="uniform"), device, dtype)
    return [p.angular for p in probe]


def following_runs(n_layers: int, dropped: list[int]) -> tuple[dict[int, list[int]], list[int]]:
    """({index among the kept layers of p: the removed layers right after p}, removed layers before
    the first kept one)."""
    runs: dict[int, list[int]] = {}
    leading: list[int] = []
    kept = -1
    for index in range(n_layers):
        if index not in dropped:
            kept += 1
        elif kept < 0:
            leading.append(index)
        else:
            runs.setdefault(kept, []).append(index)
    return runs, leading


@dataclass
class RemovedRun:
    """Removed decoder layers (dense, in order) with the keyword arguments (masks, rotary embeddings)
    each received in every calibration batch; ``__call__`` gives what they made of a hidden state."""

    layers: list[nn.Module]
    kwargs: list[list[dict[str, Any]]]  # per removed layer, per batch
    device: torch.device
    dtype: torch.dtype

    def __post_init__(self) -> None:
        self._work: list[nn.Module] = []

    @torch.no_grad()
    def __call__(self, batch: int, hidden: Tensor) -> Tensor:
        """R(hidden) for calibration batch ``batch``: hidden (B, S, d) through every removed layer."""
        if not self._work:
            self._work = [compute_copy(layer, self.device, self.dtype) for layer in self.layers]
        for work, per_batch in zip(self._work, self.kwargs):
            hidden = forward_batch(work, hidden, per_batch[batch], self.device, self.dtype)
        return hidden


def drop_layers(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    ids: Tensor,
    cfg: PruneConfig,
    device: torch.device,
    dtype: torch.dtype,
    dropped: list[int] | None = None,
) -> tuple[dict[str, Any], dict[int, RemovedRun]]:
    """Remove ``cfg.drop_layers`` decoder layers of ``model`` in place (``dropped``: these, instead of
    the least-changing ones); returns the report record and, with ``cfg.depth_repair``, the removed runs
    to repair keyed by the index of the kept layer before each (see the module docstring)."""
    n_layers = len(adapter.decoder_layers(model))
    angular: list[float] | None = None
    if dropped is None:
        least_changing_layers([0.0] * n_layers, cfg.drop_layers)  # a bad count fails before the probe pass
        angular = angular_distances(model, adapter, ids, cfg, device, dtype)
        dropped = least_changing_layers(angular, cfg.drop_layers)
    record: dict[str, Any] = {"dropped": dropped, "angular_distances": angular, "layers_before": n_layers}
    runs: dict[int, RemovedRun] = {}
    if cfg.depth_repair and dropped and adapter.mlp_output_is_residual(model):
        layers = adapter.decoder_layers(model)
        first, last = distributed.shard_bounds(ids.shape[0])  # the batches this rank's width pass sees
        batch = cfg.runtime.batch_size
        table = capture_layer_inputs(model, layers, ids[first:last], batch, device, dtype).kwargs_by_layer
        by_kept, leading = following_runs(n_layers, dropped)
        runs = {
            p: RemovedRun([layers[i] for i in run], [table[i] for i in run], device, dtype)
            for p, run in by_kept.items()
        }
        record["repaired_after"] = {str(p): run for p, run in by_kept.items()}  # kept index -> removed layers
        record["unrepaired"] = leading
    elif dropped:
        why = "off" if not cfg.depth_repair else "the MLP output is not added last in this family"
        record["repair"] = why
    adapter.remove_layers(model, dropped)
    return record, runs
