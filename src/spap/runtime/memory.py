"""Host-memory planning: the default budget, whether a run fits in memory or streams its layers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..config import OFFLOAD_MODES, PruneConfig
from ..io.shards import SafetensorsCheckpoint


def default_host_budget_gib() -> float:
    """80% of the host memory available now (psutil): the default ``--max-host-memory``."""
    import psutil

    return 0.8 * psutil.virtual_memory().available / 2**30


def shard_bytes(budget_gib: float | None) -> int:
    """Output shard size for a host budget: a shard is assembled in memory before it is written, so
    it gets an eighth of the budget, between 64 MiB and 1 GiB (1 GiB without a budget)."""
    if budget_gib is None:
        return 2**30
    return int(min(max(budget_gib * 2**30 / 8, 2**26), 2**30))


def in_memory_bytes(path: str | Path, cfg: PruneConfig | None = None) -> int | None:
    """Host bytes the in-memory path needs: for pruning with ``cfg`` the predicted peak
    (``predict_peak``), else (evaluation) the float32 weights; None when ``path`` is no local
    safetensors checkpoint (it cannot be streamed)."""
    try:
        source = SafetensorsCheckpoint(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if cfg is None:
        return 4 * source.float_elements()
    return int(predict_peak(path, cfg, streamed=False).peak_gib * 2**30)


def choose_offload(mode: str, path: str | Path, budget_gib: float, cfg: PruneConfig | None = None) -> tuple[bool, str]:
    """(offload?, why) for ``--offload mode``: auto streams the layers when the in-memory path (see
    ``in_memory_bytes``) would exceed ``budget_gib``; always fails clearly for a checkpoint that cannot
    be streamed."""
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"unknown offload mode {mode!r}; choose one of {', '.join(OFFLOAD_MODES)}")
    if mode == "never":
        return False, "--offload never"
    needed = in_memory_bytes(path, cfg)
    if needed is None:
        if mode == "always":
            if not Path(path).is_dir():
                raise FileNotFoundError(f"{path}: --offload always streams a local checkpoint directory")
            SafetensorsCheckpoint(path)  # raises what is missing
        return False, "not a local safetensors checkpoint"
    if mode == "always":
        return True, "--offload always"
    fits = needed <= budget_gib * 2**30
    verdict = "fits in" if fits else "exceeds"
    what = "predicted peak in memory" if cfg is not None else "float32 weights"
    return not fits, f"{what} {needed / 2**30:.1f} GiB {verdict} --max-host-memory {budget_gib:.1f} GiB"


RUNTIME_GIB = 0.65
"""Host memory of the process before any weight: Python, torch, transformers, the tokenizer
(measured 0.55-0.62 GiB on CPU)."""
SOLVER_MATRICES = 3
"""m x m float64 matrices the least-squares solve holds at once: the Gram matrix and two working
copies (restriction, Cholesky factor); measured 2.9 at m = 4096 (spap-ls, 30%)."""


@dataclass
class MemoryPlan:
    """Predicted peak host memory of ``spap prune`` (GiB): the larger of its phases (``prune``, and
    ``save``: writing the weights), each the sum of its named parts."""

    streamed: bool
    save: dict[str, float]
    prune: dict[str, float]

    @property
    def peak_gib(self) -> float:
        return max(sum(self.save.values()), sum(self.prune.values()))

    def line(self) -> str:
        phase = max((self.save, self.prune), key=lambda p: sum(p.values()))
        parts = " + ".join(f"{name} {gib:.2f}" for name, gib in phase.items() if gib >= 0.005)
        name = "pruning" if phase is self.prune else "saving"
        return f"predicted peak host memory {self.peak_gib:.1f} GiB (while {name}: {parts})"


def predict_peak(path: str | Path, cfg: PruneConfig, streamed: bool, save_bytes: int = 2) -> MemoryPlan:
    """Predicted peak host memory of pruning the local safetensors checkpoint ``path`` with ``cfg``
    (CPU solves; on a GPU the solver's share moves to the device), from config.json and the shard
    headers only:

    - in memory, pruning: the float32 model (4 bytes per stored element) + calibration activations +
      one MLP's solve;
    - in memory, saving: the float32 model + two copies of the weights at ``save_bytes`` per element
      (the cast state dict and the serialised buffer);
    - streamed: the float32 weights outside the decoder layers + two copies of the largest layer +
      one output shard buffer + activations + one MLP's solve.

    Activations: three n x seq_len x hidden buffers in the compute dtype (one batch when they spill).
    The solve: ``SOLVER_MATRICES`` m x m float64 matrices and the d x m cross product when the method
    solves least squares, else O(m); the refit's token rows and their activations when the method refits.
    """
    from transformers import AutoConfig

    from .device import resolve_device, resolve_dtype
    from .spill import activation_bytes

    gib = 2**30
    source = SafetensorsCheckpoint(path)
    shapes = source.shapes()
    text = AutoConfig.from_pretrained(str(path)).get_text_config()
    d, m = text.hidden_size, text.intermediate_size
    layer_elements: dict[str, int] = {}
    outside = 0
    for name, shape in shapes.items():
        parts = name.split(".")
        if "layers" in parts and parts.index("layers") + 1 < len(parts) and parts[parts.index("layers") + 1].isdigit():
            key = ".".join(parts[: parts.index("layers") + 2])
            layer_elements[key] = layer_elements.get(key, 0) + math.prod(shape)
        else:
            outside += math.prod(shape)
    dtype = resolve_dtype(cfg.runtime.compute_dtype, resolve_device(cfg.runtime.device))
    n, seq_len = cfg.calibration.n_samples, cfg.calibration.seq_len
    activations = activation_bytes(n, seq_len, d, dtype)
    budget = cfg.runtime.max_host_memory_gib
    if budget is not None and activations > budget * gib / 2:  # spilled: one batch in memory
        activations = activation_bytes(min(n, cfg.runtime.batch_size), seq_len, d, dtype)
    solver = cfg.solver
    solve = 8 * (SOLVER_MATRICES * m * m + d * m) if solver.needs_gram else 8 * 4 * m
    if solver.needs_sample:  # rows: inputs and targets (2d), gate, up and hidden activations (3m)
        solve += 4 * (2 * d + 3 * m) * (solver.refit_tokens + solver.holdout_tokens)
    shared = {"runtime": RUNTIME_GIB, "activations": activations / gib, "solve": solve / gib}
    if streamed:
        largest = max(layer_elements.values(), default=0)
        resident = {"weights outside the layers": 4 * outside / gib, "two copies of a layer": 8 * largest / gib}
        output = save_bytes * (outside + sum(layer_elements.values()))  # buffered up to one shard
        prune = {**resident, "output shard": min(shard_bytes(budget), output) / gib, **shared}
        return MemoryPlan(True, save={"runtime": RUNTIME_GIB, **resident}, prune=prune)
    elements = outside + sum(layer_elements.values())
    weights = 4 * elements / gib
    save = {"runtime": RUNTIME_GIB, "float32 weights": weights, "two copies to save": 2 * save_bytes * elements / gib}
    return MemoryPlan(False, save=save, prune={"float32 weights": weights, **shared})
