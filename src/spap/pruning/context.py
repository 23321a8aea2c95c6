"""What every layer of one pruning run shares, passed to the per-layer steps as one object."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..adapters import ArchitectureAdapter
from ..config import PruneConfig


@dataclass(frozen=True)
class LayerContext:
    """The family's adapter, the run's configuration, where layers compute (device, matmul dtype), and
    the refit's calibration token sample: ``positions`` whose inputs it uses, ``holdout_mask`` marking
    those it only measures (None: no refit sample)."""

    adapter: ArchitectureAdapter
    cfg: PruneConfig
    device: torch.device
    dtype: torch.dtype
    positions: Tensor | None = None
    holdout_mask: Tensor | None = None
