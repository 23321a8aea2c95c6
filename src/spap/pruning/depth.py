"""Depth pruning: remove whole decoder layers, the ones that change the hidden state least.

A block's change is the mean over calibration tokens of the angular distance arccos(cos(h_in,
h_out)) / pi between its input and output hidden states (ShortGPT's block influence 1 - cos ranks
tokens the same way), measured on the dense model in one pass with one layer in memory at a time.
The ``n`` blocks of least change are removed; the width pass that follows calibrates on the
shallower model, so each remaining layer is reconstructed for the inputs it now receives.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters import ArchitectureAdapter
from ..config import PruneConfig
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


def drop_layers(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    ids: Tensor,
    cfg: PruneConfig,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """Remove ``cfg.drop_layers`` decoder layers of ``model`` in place (see the module docstring);
    returns what was measured and removed, for the report."""
    n_layers = len(adapter.decoder_layers(model))
    least_changing_layers([0.0] * n_layers, cfg.drop_layers)  # a bad count fails before the probe pass
    angular = angular_distances(model, adapter, ids, cfg, device, dtype)
    dropped = least_changing_layers(angular, cfg.drop_layers)
    adapter.remove_layers(model, dropped)
    return {"dropped": dropped, "angular_distances": angular, "layers_before": n_layers}
