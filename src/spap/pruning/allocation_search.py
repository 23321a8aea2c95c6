"""``allocation="search"``: the per-layer MLP widths chosen by measurement, not by one fixed rule.

Which allocation rule is best depends on the model, the calibration text and the sparsity: on
SmolLM2-135M with in-domain calibration, FLAP's global ranking beats one uniform width at 20%
(28.52 vs 30.42 ppl@2048) and loses badly at 50% (81.38 vs 52.31, docs/studies/quality-matrix.md).
So each rule of ``SEARCHED`` prunes a copy of the dense model with the closed-form recipe (refit
"ls") on the calibration windows, each is scored by its next-token loss on calibration windows held
out from them, and the run then prunes with the user's recipe under the rule with the lowest loss.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from typing import Any

from torch import Tensor, nn

from ..config import PruneConfig
from .budget import held_out_loss

log = logging.getLogger(__name__)

SEARCHED = ("uniform", "global", "angular")
"""The rules measured: one width, FLAP's standardised global ranking, CFSP's angular sigmoid."""


def search_allocation(model: nn.Module, cfg: PruneConfig, ids: Tensor, held_out: Tensor) -> tuple[str, dict[str, Any]]:
    """(the rule of ``SEARCHED`` with the lowest held-out loss, the record of every rule's loss)."""
    from ..runtime.device import resolve_device, resolve_dtype
    from .pipeline import prune

    device = resolve_device(cfg.runtime.device)
    dtype = resolve_dtype(cfg.runtime.compute_dtype, device)
    losses: dict[str, float] = {}
    for rule in SEARCHED:
        trial = copy.deepcopy(model)
        fast = replace(cfg, allocation=rule, solver=replace(cfg.solver, refit="ls"))
        prune(trial, config=fast, calibration_ids=ids)
        losses[rule] = held_out_loss(trial, held_out, cfg.runtime.batch_size, device, dtype)
        log.info("allocation %s: held-out loss %.4f", rule, losses[rule])
        del trial
    best = min(SEARCHED, key=lambda rule: losses[rule])  # ties: the earlier (simpler) rule
    record = {
        "chosen": best,
        "held_out_loss": losses,
        "held_out_windows": held_out.shape[0],
        "search_recipe": "closed-form reconstruction (refit ls)",
    }
    return best, record
