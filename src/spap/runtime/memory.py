"""Host-memory planning: the default budget, whether a run fits in memory or streams its layers."""

from __future__ import annotations

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
    """Host bytes the in-memory path needs beyond the solver: the float32 weights plus, for pruning
    with ``cfg``, the calibration activations; None when ``path`` is no local safetensors checkpoint
    (it cannot be streamed)."""
    from transformers import AutoConfig

    from .device import resolve_device, resolve_dtype
    from .spill import activation_bytes

    try:
        source = SafetensorsCheckpoint(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    weights = 4 * source.float_elements()
    if cfg is None:
        return weights
    config = AutoConfig.from_pretrained(str(path)).get_text_config()
    dtype = resolve_dtype(cfg.runtime.compute_dtype, resolve_device(cfg.runtime.device))
    n, seq_len = cfg.calibration.n_samples, cfg.calibration.seq_len
    return weights + activation_bytes(n, seq_len, config.hidden_size, dtype)


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
    return not fits, f"in memory {needed / 2**30:.1f} GiB {verdict} --max-host-memory {budget_gib:.1f} GiB"
