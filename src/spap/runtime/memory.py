"""Host-memory planning: the default budget, whether a run fits in memory or streams its layers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import OFFLOAD_MODES, PruneConfig
from ..core.stats import CHUNK_TOKENS
from ..io.shards import SafetensorsCheckpoint
from .device_memory import DevicePlan, peak_gib, peak_line, predict_device_peak, solver_matrices


def default_host_budget_gib() -> float:
    """80% of the host memory available now (psutil): the default ``--max-host-memory``."""
    import psutil

    return 0.8 * psutil.virtual_memory().available / 2**30


def shard_bytes(budget_gib: float | None, largest_layer_bytes: int | None = None) -> int:
    """Output shard size for a host budget: a shard is assembled in memory before it is written, so
    it gets an eighth of the budget, between 64 MiB and 1 GiB (1 GiB without a budget). Streamed runs
    pass their largest decoder layer's size at the save dtype: the shard is then at most two such
    layers (at least 64 MiB), so the writer's buffer does not grow with the model's depth."""
    cap = 2**30 if budget_gib is None else int(min(max(budget_gib * 2**30 / 8, 2**26), 2**30))
    if largest_layer_bytes is not None:
        cap = min(cap, max(2 * largest_layer_bytes, 2**26))
    return cap


def in_memory_bytes(path: str | Path, cfg: PruneConfig | None = None, save_bytes: int = 2) -> int | None:
    """Host bytes the in-memory path needs: for pruning with ``cfg`` the predicted peak
    (``predict_peak``), else (evaluation) the float32 weights; None when ``path`` is no local
    safetensors checkpoint (it cannot be streamed)."""
    try:
        source = SafetensorsCheckpoint(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if cfg is None:
        return 4 * source.float_elements()
    return int(predict_peak(path, cfg, streamed=False, save_bytes=save_bytes).peak_gib * 2**30)


def choose_offload(
    mode: str, path: str | Path, budget_gib: float, cfg: PruneConfig | None = None, save_bytes: int = 2
) -> tuple[bool, str]:
    """(offload?, why) for ``--offload mode``: auto streams the layers when the in-memory path (see
    ``in_memory_bytes``) would exceed ``budget_gib``; always fails clearly for a checkpoint that cannot
    be streamed."""
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"unknown offload mode {mode!r}; choose one of {', '.join(OFFLOAD_MODES)}")
    if mode == "never":
        return False, "--offload never"
    needed = in_memory_bytes(path, cfg, save_bytes)
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


def _layer_key(name: str) -> str | None:
    """``model.layers.3`` for ``model.layers.3.mlp.up_proj.weight``; None outside the decoder layers."""
    parts = name.split(".")
    if "layers" in parts:
        at = parts.index("layers") + 1
        if at < len(parts) and parts[at].isdigit():
            return ".".join(parts[: at + 1])
    return None


def elements_per_layer(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Stored elements of each decoder layer (keyed by its name prefix) in a checkpoint of ``shapes``."""
    out: dict[str, int] = {}
    for name, shape in shapes.items():
        key = _layer_key(name)
        if key is not None:
            out[key] = out.get(key, 0) + math.prod(shape)
    return out


RUNTIME_GIB = 0.48
"""Host memory of the process beside the weights, activations and solve: Python, torch, transformers,
the tokenizer, calibration tokens and the layer forward's transients. Measured on CPU (Xeon, glibc's
mmap threshold fixed): 0.33 GiB before the first weight, 0.37-0.39 while pruning, and 0.1 more at the
peak of a layer's solve than the named terms account for."""


@dataclass
class MemoryPlan:
    """Predicted peak host memory of ``spap prune`` (GiB): the largest of its phases (``prune``,
    ``save``: writing the weights, and in memory ``load``: reading them), each the sum of its named parts."""

    streamed: bool
    save: dict[str, float]
    prune: dict[str, float]
    load: dict[str, float] = field(default_factory=dict)
    device: DevicePlan | None = None  # the accelerator's peak, when the layers compute on one

    def _phases(self) -> dict[str, dict[str, float]]:
        return {"pruning": self.prune, "saving": self.save, "loading": self.load}

    @property
    def peak_gib(self) -> float:
        return peak_gib(self._phases())

    def line(self) -> str:
        host = peak_line("host", self._phases())
        return host if self.device is None else f"{host}; {self.device.line()}"


def predict_peak(path: str | Path, cfg: PruneConfig, streamed: bool, save_bytes: int = 2) -> MemoryPlan:
    """Predicted peak host memory of pruning the local safetensors checkpoint ``path`` with ``cfg``,
    from config.json and the shard headers only (see ``predict_peak_of_shapes``)."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(str(path)).get_text_config()
    source = SafetensorsCheckpoint(path)
    stored = sum((source.directory / file).stat().st_size for file in set(source.weight_map.values()))
    return predict_peak_of_shapes(
        source.shapes(),
        text.hidden_size,
        text.intermediate_size,
        cfg,
        streamed,
        save_bytes,
        stored,
        mapped_elements=source.float32_elements(),
    )


def predict_peak_of_config(config: Any, cfg: PruneConfig, streamed: bool, save_bytes: int = 2) -> MemoryPlan:
    """The same for a model that exists only as a transformers config (e.g. ``LlamaConfig(...)`` of
    LLaMA-3-70B): the shapes come from the model built on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied weights once
    text = config.get_text_config()
    return predict_peak_of_shapes(shapes, text.hidden_size, text.intermediate_size, cfg, streamed, save_bytes)


def predict_peak_of_shapes(
    shapes: dict[str, tuple[int, ...]],
    d: int,
    m: int,
    cfg: PruneConfig,
    streamed: bool,
    save_bytes: int = 2,
    stored_bytes: int | None = None,
    mapped_elements: int = 0,
) -> MemoryPlan:
    """Predicted peak host memory of pruning a model whose tensors have ``shapes`` (hidden size d,
    MLP width m) with ``cfg`` (CPU solves; on a GPU the solve's share moves to the device):

    - in memory, pruning: the float32 model (4 bytes per stored element) + calibration activations +
      one MLP's solve + one float32 copy of the largest layer (its pruned weights while the old ones
      live). The ``mapped_elements`` the checkpoint stores in float32 are used in place from the mapped
      files, whose pages stay resident until the end: there the pruned layers' new weights add up;
    - in memory, searching (``target_ratio``, allocation "search"): also a float32 copy of the model and
      a slice of logits while a candidate is pruned and scored;
    - in memory, loading: the float32 model + the files of the tensors converted to float32
      (``stored_bytes``, default ``save_bytes`` per element, less the mapped float32 ones), whose mapped
      pages stay resident while they are converted;
    - in memory, saving: the pruned float32 model (and the mapped pages) + one copy at ``save_bytes`` per
      element when that is not float32 (safetensors writes the tensors without another copy);
    - streamed: the embeddings (stored dtype) + the largest layer in float32 and in the compute dtype +
      the output buffer (one shard at most) + activations + one MLP's solve.

    Activations: three n x seq_len x hidden buffers in the compute dtype (one batch when they spill);
    while statistics accumulate, one chunk (at most a batch) of intermediate activations and outputs
    in float32 and the batch's MLP intermediates in the layer forward (3 x tokens x m, compute dtype).
    The solve: ``solver_matrices`` m x m matrices (float64, or float32) and the d x m cross product when
    the method solves least squares, else W_down and |W_down| in float64 and O(m); the refit's token
    rows and their activations when the method refits.
    """
    from .device import planned_device, resolve_dtype
    from .spill import activation_bytes

    gib = 2**30
    layer_elements = elements_per_layer(shapes)
    elements = sum(math.prod(shape) for shape in shapes.values())
    outside = elements - sum(layer_elements.values())
    head = sum(math.prod(shape) for name, shape in shapes.items() if name.split(".")[0] == "lm_head")
    device = planned_device(cfg.runtime.device)
    dtype = resolve_dtype(cfg.runtime.compute_dtype, device)
    largest = max(layer_elements.values(), default=0)
    on_device = None
    if device.type == "cuda":  # the weights outside the layers move to the device at their host dtype
        outside_bytes = save_bytes if streamed else 4
        on_device = predict_device_peak(d, m, largest, outside, cfg, dtype, outside_bytes)
    n, seq_len = cfg.calibration.n_samples, cfg.calibration.seq_len
    activations = activation_bytes(n, seq_len, d, dtype)
    budget = cfg.runtime.max_host_memory_gib
    if budget is not None and activations > budget * gib / 2:  # spilled: one batch in memory
        activations = activation_bytes(min(n, cfg.runtime.batch_size), seq_len, d, dtype)
    solver = cfg.solver
    matrix_bytes = solver.matrix_dtype.itemsize  # float64, or float32 with solve_dtype "float32"
    matrices = solver_matrices(cfg.sparsity, solver.selection_rule)
    solve = matrix_bytes * (matrices * m * m + d * m) if solver.needs_gram else 8 * (2 * d * m + 4 * m)
    if solver.needs_sample:  # rows: inputs and targets (2d), gate, up and hidden activations (3m)
        solve += 4 * (2 * d + 3 * m) * (solver.refit_tokens + solver.holdout_tokens)
    # while statistics accumulate: one chunk's float32 z and y (a batch's tokens at most), and the
    # layer forward's MLP intermediates for the batch (gate, up and their product in the compute dtype)
    batch_tokens = min(n, cfg.runtime.batch_size) * seq_len
    statistics = 4 * min(CHUNK_TOKENS, batch_tokens) * (d + m) + 3 * batch_tokens * m * dtype.itemsize
    # both are freed before the solve starts: the larger of the two counts
    shared = {
        "runtime": RUNTIME_GIB,
        "activations": activations / gib,
        "solve or statistics": max(statistics, solve) / gib,
    }
    layers = len(layer_elements)
    dropped = min(cfg.drop_layers, layers)  # whole layers removed first
    mlp = 3 * d * m * (layers - dropped)  # GLU: up, gate, down of the layers that stay
    cuts_mlp = cfg.prunes_mlp and cfg.sparsity > 0
    mlp_removed = cfg.sparsity * mlp if cuts_mlp else 0
    removed = mlp_removed + dropped * sum(layer_elements.values()) / max(layers, 1)
    kept = (elements - removed) / gib
    if streamed:
        # the embedding table stays in its stored dtype (taken as the save dtype); the head is not read
        embeddings = save_bytes * (outside - head) / gib
        # the layer read in float32, and its copy in the compute dtype that runs the calibration tokens
        layer_copies = (4 + dtype.itemsize) * largest / gib
        resident = {"weights outside the layers": embeddings, "a layer in float32 and compute dtype": layer_copies}
        shard = shard_bytes(budget, save_bytes * largest)
        output = min(shard / gib, save_bytes * kept)  # written shard by shard
        prune = {**resident, "output shard": output, **shared}
        return MemoryPlan(True, save={"runtime": RUNTIME_GIB, **resident}, prune=prune, device=on_device)
    from ..pruning.budget import HEAD_BYTES

    weights = 4 * elements / gib
    mapped = mapped_elements / max(elements, 1)  # the fraction used in place from the files
    cast = save_bytes * kept if save_bytes != 4 else 0.0
    # the replaced modules' new float32 weights: kept MLP neurons (and attention, when heads are cut)
    # (a depth repair rewrites W_down of at most one layer per removed layer)
    attention_kept = 1 - cfg.head_sparsity if cfg.prunes_heads else 0.0
    attention = attention_kept * (sum(layer_elements.values()) - 3 * d * m * layers)
    rewritten = mlp - mlp_removed if cuts_mlp else d * m * dropped * cfg.depth_repair
    # converted tensors are freed as they are replaced (one layer's new weights at a time); beside
    # the mapped ones the new weights add up, as the old pages stay resident
    stay = "pruned layers' new weights (old pages stay mapped)"
    accumulated = 4 * mapped * (rewritten + attention) / gib
    new_weights = {"a layer's new weights": 4 * (1 - mapped) * largest / gib}
    new_weights[stay] = accumulated
    resident = {"pruned float32 weights": 4 * (1 - mapped) * kept, "float32 weights (mapped)": mapped * weights}
    resident[stay] = accumulated
    save = {"runtime": RUNTIME_GIB, **resident, "a copy to save": cast}
    prune = {"float32 weights": weights, **new_weights, **shared}
    if cfg.target_ratio is not None or cfg.allocation == "search":  # each candidate prunes a copy, then is scored
        prune["search: a pruned copy and its logits"] = weights + HEAD_BYTES / gib
    stored = save_bytes * elements if stored_bytes is None else stored_bytes
    files = max(stored - 4 * mapped_elements, 0) / gib  # the converted tensors' files
    load = {"runtime": RUNTIME_GIB, "float32 weights": weights, "checkpoint files mapped": files}
    return MemoryPlan(False, save=save, prune=prune, load=load, device=on_device)
