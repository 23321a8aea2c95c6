"""Shared pieces of the benchmark scripts: method variants, one isolated pruning run, tables, JSON."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

VARIANTS: dict[str, dict[str, Any]] = {
    # name: PruneConfig overrides; "solver" holds SolverConfig overrides
    "dense": {},
    "spap": {"solver": {}},
    "spap-no-penalty": {"solver": {"selection": "score"}},
    "spap-no-refit": {"solver": {"refit": "ls"}},
    "spap-gd-refit": {"solver": {"refit": "gd"}},
    "spap-structprune": {"solver": {}, "allocation": "structprune"},
    "spap-no-refit-structprune": {"solver": {"refit": "ls"}, "allocation": "structprune"},
    "spap-no-refit-global": {"solver": {"refit": "ls"}, "allocation": "global"},
    "spap-angular": {"solver": {}, "allocation": "angular"},
    "spap-no-refit-angular": {"solver": {"refit": "ls"}, "allocation": "angular"},
    "spap-no-penalty-angular": {"solver": {"selection": "score"}, "allocation": "angular"},
    "magnitude": {"solver": {"method": "magnitude"}},
    "wanda-sp": {"solver": {"method": "wanda-sp"}},
    "fasp": {"solver": {"method": "fasp"}},
    "flap": {"solver": {"method": "flap"}},
    "cfsp": {"solver": {"method": "cfsp"}},
}


SHAPES = {  # public config values of the named models (random weights)
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "llama3-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "smoke": dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,  # script checks
        num_key_value_heads=2,
        vocab_size=512,
    ),
}


def shape_model(shape: str, dtype: Any, device: str = "cpu", layers: int | None = None) -> Any:
    """Random-weight LLaMA of a named shape (``layers``: keep only the first N decoder layers)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    values = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    with torch.device(device):
        return AutoModelForCausalLM.from_config(LlamaConfig(**values), dtype=dtype).eval()


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pin_gguf_float32() -> None:
    """Convert GGUF models to float32 caches in this process and its children (unless the environment
    says otherwise): the result tables' rows were measured on float32 dequantisations, spap's default
    cache is bfloat16 since 2026-12-06."""
    os.environ.setdefault("SPAP_GGUF_DTYPE", "float32")


def machine() -> str:
    """CPU model, threads and GPU: results from different machines must not be compared unawares."""
    import torch

    cpu = cpu_model()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} threads, {gpu}"


def _run(job: dict[str, Any]) -> dict[str, Any]:
    """One pruning + evaluation run (executed in a fresh process so peak memory is its own)."""
    import torch

    import spap
    from spap.config import PruneConfig
    from spap.evaluation.perplexity import perplexity
    from spap.evaluation.zeroshot import evaluate_task, load_task
    from spap.io.calibration import load_text
    from spap.io.models import load_model

    torch.manual_seed(job["seed"])
    model, tokenizer, path = load_model(job["model"])
    row: dict[str, Any] = {"variant": job["variant"], "sparsity": job["sparsity"], "model": path, "machine": machine()}
    overrides = dict(VARIANTS[job["variant"]])
    overrides.update(job.get("overrides", {}))
    t0 = time.perf_counter()
    if job["variant"] != "dense":
        solver = {**overrides.pop("solver", {}), **job.get("solver", {})}
        # overrides name fields flat (``--set token_weighting=residual``): version 2's form, which
        # from_dict sorts into the runtime and experimental sections
        flat = {"sparsity": job["sparsity"], "seed": job["seed"], "solver": solver, **overrides}
        cfg = PruneConfig.from_dict({"version": 2, **flat, "calibration": job["calibration"]})
        report = spap.prune(model, tokenizer, cfg)
        row.update(
            prune_seconds=report.seconds["total"],
            peak_rss_gib=report.memory["peak_rss_gib"],
            parameters=report.parameters_after,
            parameters_before=report.parameters_before,
            widths=report.widths,
            mean_layer_error=sum(r.error for r in report.layers) / len(report.layers),
            config=report.config,
            calibration_shape=report.calibration_shape,
            allocation=report.extra.get("allocation"),
            device=report.device,
            refit_rejected=[r.index for r in report.layers if r.refit_accepted is False],
            layer_errors=[dict(ls=r.error_ls, refit=r.error_refit) for r in report.layers],
        )
        if "peak_gpu_gib" in report.memory:
            row["peak_gpu_gib"] = report.memory["peak_gpu_gib"]
        if job.get("save"):
            spap.save_pruned(model, job["save"], tokenizer, report.to_dict(), overwrite=True)
    else:
        row.update(parameters=sum(p.numel() for p in model.parameters()), prune_seconds=0.0)
    dtype = getattr(torch, job["eval_dtype"])
    if torch.cuda.is_available():
        model.to("cuda")  # pruning returns the weights to the host; evaluate where it is fast
    text = load_text(job["ppl_file"])
    row["ppl"] = {}
    for seq_len in job["seq_lens"]:
        windows = job["max_tokens"] // seq_len if job.get("max_tokens") else None
        r = perplexity(model, tokenizer, text, seq_len, dtype=dtype, max_windows=windows, progress=False)
        row["ppl"][str(seq_len)] = r.to_dict()
    for task in job.get("tasks", []):
        name, examples = load_task(task, job.get("task_limit"))
        row.setdefault("zeroshot", {})[name] = evaluate_task(
            model, tokenizer, examples, name, dtype=dtype, progress=False
        ).to_dict()
    row["seconds"] = time.perf_counter() - t0
    return row


def _die_with_parent(parent_pid: int) -> None:
    """Pool initializer: on Linux, have the kernel send SIGTERM to this worker when its parent dies.

    A killed benchmark (SIGTERM or SIGKILL) runs no cleanup, so without this its row process goes
    on pruning for up to an hour, holding the cores that the next run measures its time on."""
    import signal

    from spap.runtime.device import glibc

    libc = glibc()
    if libc is None:
        return
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def run_isolated(job: dict[str, Any], fn: Callable[[dict[str, Any]], dict[str, Any]] = _run) -> dict[str, Any]:
    """``fn(job)`` in a fresh process, so peak memory (ru_maxrss, CUDA peaks) is that run's own; the
    process ends when this one does, also when this one is killed."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1, initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
        return pool.apply(fn, (job,))


def held_out_layer(model: Any, adapter: Any, x: Any, layer: int, sparsity: float) -> tuple[int, Any, int]:
    """For a per-layer study on captured MLP inputs x (N, d): (fit rows: the first 75%, the dense MLP of
    ``layer`` in float32, neurons to prune at ``sparsity``); the last 25% of x are held out."""
    import torch

    dense = adapter.read_mlp(adapter.decoder_layers(model)[layer]).to(dtype=torch.float32)
    return int(0.75 * x.shape[0]), dense, int(round(sparsity * dense.width))


def capture_dense(
    model: Any,
    adapter: Any,
    ids: Any,
    layer_ids: list[int],
    outputs: bool = False,
    batch_size: int = 4,
    dtype: Any = None,
) -> tuple[dict[int, Any], dict[int, Any]]:
    """MLP inputs x (N, d) of the dense model at ``layer_ids`` (autocast forwards in ``dtype``, default
    bf16; stored float32 on the CPU) and, with ``outputs``, the layers' output hidden states h (N, d);
    else an empty dict."""
    import torch

    layers = adapter.decoder_layers(model)
    xs: dict[int, list] = {i: [] for i in layer_ids}
    hs: dict[int, list] = {i: [] for i in layer_ids} if outputs else {}
    handles = []
    for i in layer_ids:
        handles.append(
            adapter.mlp_input_linear(layers[i]).register_forward_pre_hook(
                lambda _m, a, i=i: xs[i].append(a[0].flatten(0, -2).float().cpu())
            )
        )
        if outputs:
            handles.append(
                layers[i].register_forward_hook(
                    lambda _m, _a, o, i=i: hs[i].append(
                        (o[0] if isinstance(o, tuple) else o).flatten(0, -2).float().cpu()
                    )
                )
            )
    try:
        dtype = torch.bfloat16 if dtype is None else dtype
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            for s in range(0, ids.shape[0], batch_size):
                model(input_ids=ids[s : s + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(v) for i, v in xs.items()}, {i: torch.cat(v) for i, v in hs.items()}


def load_rows(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def save_rows(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    tmp.replace(path)


def headless_pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or None where matplotlib is not installed (plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
