"""One call that does what ``spap prune`` does: checkpoint in, smaller checkpoint out.

    import spap
    result = spap.prune_checkpoint("path/to/model", "out", spap.PruneConfig(sparsity=0.3))

``prune_checkpoint`` checks the arguments before any work, loads the model (or streams it one
decoder layer at a time when it would not fit the host-memory budget), prunes it, optionally
measures perplexity before and after, and writes the checkpoint with ``pruning.json`` atomically.
The CLI parses flags into a ``PruneConfig`` and calls it; ``spap.prune`` stays for a model already
in memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import OFFLOAD_MODES, PruneConfig
from .errors import UsageError
from .pruning.pipeline import PruneReport
from .runtime.device import resolve_device
from .runtime.memory import MemoryPlan

log = logging.getLogger(__name__)

SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class CheckpointResult:
    """What ``prune_checkpoint`` did: where, from what, the report and what pruning.json holds."""

    out: Path
    source: str  # the checkpoint that was read (GGUF input: its converted cache)
    report: PruneReport
    record: dict[str, Any]  # pruning.json's content (the save time excepted)
    metrics: dict[str, Any] = field(default_factory=dict)  # {"dense"|"pruned": {text: perplexity}}
    offloaded: bool = False

    @property
    def stock(self) -> bool:
        """True when plain ``AutoModelForCausalLM.from_pretrained(out)`` loads the checkpoint."""
        from .io.checkpoint import REMOTE_CODE_FILE

        return not (self.out / REMOTE_CODE_FILE).exists()


def prune_checkpoint(
    model: str | None,
    out: str | Path,
    config: PruneConfig | None = None,
    *,
    offload: str = "auto",
    save_dtype: str = "auto",
    overwrite: bool = False,
    pad_to_uniform: bool = False,
    ppl: list[str] | None = None,
    ppl_seq_len: int = 2048,
    eval_dtype: str = "auto",
    record: dict[str, Any] | None = None,
    echo: Callable[[str], None] | None = None,
) -> CheckpointResult:
    """Prune the checkpoint ``model`` (a directory, a ``.gguf`` file, a cached hub id, or None for the
    embedded SmolLM2-135M) with ``config`` and write the result to ``out``.

    offload:        "auto" (stream the layers when the in-memory run would exceed
                    ``config.runtime.max_host_memory_gib``, default 80% of the available memory), "never",
                    "always".
    save_dtype:     dtype of the written weights; "auto" keeps the input's (bfloat16 for GGUF).
    pad_to_uniform: zero-pad per-layer MLP widths to the widest (stock-loadable).
    ppl:            text files (or "bundled-heldout") to measure perplexity on before and after,
                    at ``ppl_seq_len`` with matmuls in ``eval_dtype`` ("auto": bfloat16 where the device
                    runs it fast, else float32); in memory only.
    record:         extra entries for pruning.json (the CLI stores its command line).
    echo:           where progress lines go (default: the log).

    Bad arguments raise ``UsageError`` before the model loads; nothing is left at ``out`` on any
    failure. Data-parallel ranks (torchrun) each run this; rank 0 writes.
    """
    from .pruning import distributed

    say = echo or log.info
    _check_choice("save_dtype", save_dtype, SAVE_DTYPES)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UsageError(f"{out} exists and is not an empty directory; pass --overwrite to replace it")
    cfg, source, streamed, dtype, plan = _prepare(model, config, offload, save_dtype, ppl, ppl_seq_len, pad_to_uniform)
    try:  # planned even where the device is missing (--dry-run); run only where it is here
        resolve_device(cfg.runtime.device)
    except RuntimeError as exc:
        raise UsageError(f"{exc} (spap prune --dry-run plans such a run)") from exc
    if plan is not None:
        say(plan.line())
    writes = distributed.rank() == 0
    torch.manual_seed(cfg.seed)
    extra = {"model": source, "metrics": {}, **(record or {}), "save_dtype": str(dtype).removeprefix("torch.")}
    if plan is not None:
        extra["predicted_peak_rss_gib"] = round(plan.peak_gib, 2)
        if plan.device is not None:
            extra["predicted_peak_gpu_gib"] = round(plan.device.peak_gib, 2)
    if streamed:
        result = _prune_streamed(source, out, cfg, dtype, overwrite, extra, say)
    else:
        texts = _Texts(ppl, ppl_seq_len, eval_dtype) if ppl is not None and writes else None
        result = _prune_in_memory(model, out, cfg, dtype, overwrite, pad_to_uniform, extra, say, texts, writes)
    done = result.report
    depth = done.extra.get("depth")
    layers = f" and {len(depth['dropped'])} of {depth['layers_before']} layers" if depth else ""
    before = sum(layer.width_before for layer in done.layers)
    sparsity = 1 - sum(done.widths) / before if before else 0.0  # as pruned: widths rounded to the multiple
    say(
        f"pruned {sparsity:.1%} of MLP neurons{layers} with {cfg.solver.method} in {done.seconds['total']:.0f}s: "
        f"{done.parameters_before / 1e6:.1f}M -> {done.parameters_after / 1e6:.1f}M parameters; "
        f"peak RSS {done.memory['peak_rss_gib']:.1f} GiB"
        + (f" (predicted {plan.peak_gib:.1f})" if plan else "")
        + _gpu_peak(done.memory, plan)
    )
    return result


def _gpu_peak(memory: dict[str, float], plan: MemoryPlan | None) -> str:
    """ ", peak GPU memory X GiB (predicted Y)" for a run on a GPU, else nothing."""
    if "peak_gpu_gib" not in memory:
        return ""
    predicted = f" (predicted {plan.device.peak_gib:.1f})" if plan is not None and plan.device is not None else ""
    return f", peak GPU memory {memory['peak_gpu_gib']:.1f} GiB{predicted}"


def plan_checkpoint(model: str | None, config: PruneConfig | None = None, *, offload: str = "auto") -> Plan:
    """What ``prune_checkpoint`` would do, without loading the model: the checks it makes, whether it
    streams the layers, and its predicted peak host memory (``spap prune --dry-run``)."""
    _, source, streamed, _, memory = _prepare(model, config, offload, "auto", None, 2048, False)
    return Plan(source, streamed, memory)


@dataclass
class Plan:
    """``plan_checkpoint``'s answer; ``memory`` is None where spap cannot size the input (no local
    safetensors checkpoint)."""

    source: str
    streamed: bool
    memory: MemoryPlan | None

    def line(self) -> str:
        where = "streamed one decoder layer at a time" if self.streamed else "in memory"
        return f"{self.source}: {where}; " + (self.memory.line() if self.memory else "memory not predicted")


def _prepare(
    model: str | None,
    config: PruneConfig | None,
    offload: str,
    save_dtype: str,
    ppl: list[str] | None,
    ppl_seq_len: int,
    pad_to_uniform: bool,
) -> tuple[PruneConfig, str, bool, torch.dtype, MemoryPlan | None]:
    """The checks before any work (``UsageError``), then (the run's own config, the checkpoint path
    as resolved, whether the layers are streamed, the save dtype, the predicted peak memory)."""
    from .io.calibration import check_calibration_source
    from .io.models import resolve_model
    from .pruning import distributed
    from .runtime.memory import predict_peak

    cfg = PruneConfig.from_dict(config.to_dict()) if config is not None else PruneConfig()
    _check_choice("offload", offload, OFFLOAD_MODES)
    try:  # an unreadable calibration text is a bad argument: fail before the model loads
        check_calibration_source(cfg.calibration.source)
    except (OSError, ValueError) as exc:
        raise UsageError(f"calibration: {exc}") from exc
    cfg.runtime.device = distributed.init_from_env(cfg.runtime.device)
    source = resolve_model(model)
    check_positions(
        source, {"--seq-len": cfg.calibration.seq_len, **({"--ppl-seq-len": ppl_seq_len} if ppl is not None else {})}
    )
    _check_depth(source, cfg.drop_layers)
    dtype = _save_dtype(save_dtype, model, source)
    streamed = _plan_offload(offload, source, cfg, ppl is not None, pad_to_uniform, dtype.itemsize)
    try:
        memory = predict_peak(source, cfg, streamed, dtype.itemsize)
    except (FileNotFoundError, NotADirectoryError):  # a hub id or another format: not sized
        memory = None
    if memory is not None:
        memory = _fit_solve_dtype(source, cfg, streamed, dtype.itemsize, memory)
    return cfg, source, streamed, dtype, memory


def _fit_solve_dtype(source: str, cfg: PruneConfig, streamed: bool, save_bytes: int, plan: MemoryPlan) -> MemoryPlan:
    """Resolve ``solve_dtype`` "auto" in ``cfg``: float64, unless its plan exceeds the host budget or
    the GPU's memory and float32 statistics and solves (half the m x m state) lower it; the plan of the
    resolved dtype. A plan over either way is run with a warning (the prediction is an upper bound)."""
    from .runtime.device import gpu_memory_gib
    from .runtime.memory import predict_peak

    limits = [("host", "--max-host-memory", cfg.runtime.max_host_memory_gib)]
    limits.append(("GPU", "the GPU's memory", gpu_memory_gib(cfg.runtime.device)))

    def excess(p: MemoryPlan) -> list[tuple[str, str, float, float]]:
        peaks = {"host": p.peak_gib, "GPU": p.device.peak_gib if p.device is not None else None}
        return [
            (kind, name, peak, limit)
            for kind, name, limit in limits
            if limit is not None and (peak := peaks[kind]) is not None and peak > limit
        ]

    if cfg.solver.solve_dtype == "auto" and excess(plan):
        cfg.solver.solve_dtype = "float32"
        smaller = predict_peak(source, cfg, streamed, save_bytes)
        if len(excess(smaller)) < len(excess(plan)) or smaller.peak_gib < plan.peak_gib:
            for kind, name, peak, limit in excess(plan):
                log.info(
                    "solving in float32: the float64 plan's %s peak (%.1f GiB) exceeds %s %.1f GiB",
                    kind,
                    peak,
                    name,
                    limit,
                )
            plan = smaller
        else:
            cfg.solver.solve_dtype = "auto"
    for kind, name, peak, limit in excess(plan):
        log.warning(
            "predicted peak %s memory %.1f GiB exceeds %s %.1f GiB; the run may be killed for memory "
            "(fewer --n-samples, --offload always or --solve-dtype float32 lower it)",
            kind,
            peak,
            name,
            limit,
        )
    return plan


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def check_positions(source: str, lengths: dict[str, int]) -> None:
    """Refuse window lengths beyond the positions the model at ``source`` (as ``resolve_model`` gives
    it) was built for: its perplexity there (and a calibration on such windows) would be silently
    meaningless, or fail deep inside attention."""
    from .io.models import max_positions

    limit = max_positions(source)
    for flag, length in lengths.items():
        if limit is not None and length > limit:
            raise UsageError(
                f"{flag} {length} exceeds the {limit} positions the model was built for "
                f"(max_position_embeddings); pass {flag} {limit} or less"
            )


def _check_depth(source: str, drop_layers: int) -> None:
    if not drop_layers:
        return
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(source).get_text_config().num_hidden_layers
    if drop_layers >= layers:
        raise UsageError(f"--drop-layers {drop_layers} must be less than the model's {layers} decoder layers")


def _save_dtype(name: str, model: str | None, source: str) -> torch.dtype:
    from .io.models import source_dtype

    return source_dtype(model, source) if name == "auto" else getattr(torch, name)


def _plan_offload(
    mode: str, source: str, cfg: PruneConfig, evaluate: bool, pad_to_uniform: bool, save_bytes: int
) -> bool:
    """Decide ``offload`` (and fill in the default host-memory budget); options the streamed path
    cannot honour are bad arguments."""
    from .runtime.memory import choose_offload, default_host_budget_gib

    if cfg.runtime.max_host_memory_gib is None:
        cfg.runtime.max_host_memory_gib = round(default_host_budget_gib(), 1)
    if mode == "never":
        return False
    streamed, why = choose_offload(mode, source, cfg.runtime.max_host_memory_gib, cfg, save_bytes)
    log.info("%s: %s", "offloading" if streamed else "in memory", why)
    if not streamed:
        return False
    conflicts = {
        "--eval": (evaluate, "it holds the whole model; run `spap eval OUT` after pruning"),
        "--pad-to-uniform": (pad_to_uniform, "the streamed writer keeps each layer's own width"),
        "--calib self": (cfg.calibration.source == "self", "it samples text from the whole model; pass a text file"),
        "--drop-layers": (cfg.drop_layers > 0, "removing layers is done in memory for now"),
        "--target-ratio": (cfg.target_ratio is not None, "the search prunes copies of the model in memory"),
        "--allocation search": (cfg.allocation == "search", "the search prunes copies of the model in memory"),
    }
    for flag, (used, reason) in conflicts.items():
        if used:
            raise UsageError(
                f"{flag} does not work with out-of-core pruning ({why}): {reason}, or pass --offload never"
            )
    return True


@dataclass
class _Texts:
    """Perplexity before and after pruning: text files, window length, matmul dtype."""

    files: list[str]
    seq_len: int
    dtype: str


def _prune_streamed(
    source: str,
    out: Path,
    cfg: PruneConfig,
    dtype: torch.dtype,
    overwrite: bool,
    extra: dict[str, Any],
    say: Callable[[str], None],
) -> CheckpointResult:
    """One decoder layer in memory at a time (``pruning.offload.prune_offloaded``)."""
    from transformers import AutoTokenizer

    from .pruning.offload import prune_offloaded

    say(f"model {source}: pruned out of core, one decoder layer in memory at a time")
    tokenizer = AutoTokenizer.from_pretrained(source)
    report = prune_offloaded(source, out, cfg, tokenizer, save_dtype=dtype, overwrite=overwrite, report_extra=extra)
    record = {**report.to_dict(), **extra, "offload": True}
    return CheckpointResult(out, source, report, record, offloaded=True)


def _prune_in_memory(
    model: str | None,
    out: Path,
    cfg: PruneConfig,
    dtype: torch.dtype,
    overwrite: bool,
    pad_to_uniform: bool,
    extra: dict[str, Any],
    say: Callable[[str], None],
    texts: _Texts | None,
    writes: bool,
) -> CheckpointResult:
    from .evaluation.texts import check_texts, perplexities
    from .io.checkpoint import save_pruned
    from .io.models import load_model
    from .pruning.pipeline import prune
    from .runtime.host_malloc import fix_mmap_threshold

    texts = _Texts(check_texts(texts.files), texts.seq_len, texts.dtype) if texts is not None else None
    # freed solver buffers and replaced weights go back to the system, not into a heap that grows
    # layer after layer (as out-of-core pruning does)
    fix_mmap_threshold()
    started = time.perf_counter()
    loaded, tokenizer, source = load_model(model)
    load_seconds = time.perf_counter() - started
    say(f"model {source}: {sum(p.numel() for p in loaded.parameters()) / 1e6:.1f}M parameters")
    metrics: dict[str, Any] = {}
    if texts is not None:
        say("dense:")
        metrics["dense"] = perplexities(loaded, tokenizer, texts.files, texts.seq_len, texts.dtype, echo=say)
    report = prune(loaded, tokenizer, cfg)
    if texts is not None:
        say("pruned:")
        metrics["pruned"] = perplexities(loaded, tokenizer, texts.files, texts.seq_len, texts.dtype, echo=say)
    record = {**report.to_dict(), **extra, "metrics": metrics}
    record["seconds"]["load"] = load_seconds
    if writes:  # data-parallel workers: rank 0 writes the checkpoint
        generated = report.calibration_ids if cfg.calibration.source == "self" else None  # slow to redo: keep
        save_pruned(
            loaded,
            out,
            tokenizer,
            record,
            overwrite=overwrite,
            pad_to_uniform=pad_to_uniform,
            calibration_ids=generated,
            dtype=dtype,
        )
    return CheckpointResult(out, source, report, record, metrics)
