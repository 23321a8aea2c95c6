"""Inference speed and memory of dense vs pruned models, measured in one process.

* prefill: tokens/s of a forward pass over (batch, seq_len) prompts.
* decode:  ms per generated token with a static KV cache, batch 1 and batched.  On CUDA the
  single-token step is captured with torch.compile(mode="reduce-overhead") (CUDA graphs) so the
  measurement is not launch-bound; on CPU it runs eagerly.
* bytes per decode step: weights read once per generated token (all parameters except the input
  embedding table, of which one row per token is read).  dense_bytes / pruned_bytes is the speedup
  limit of memory-bound decoding; the benchmark prints how close the measured ratio gets.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..runtime.device import autocast_for


@dataclass
class SpeedResult:
    parameters: int
    weight_bytes: int
    decode_bytes: int
    prefill_tokens_per_s: float
    decode_ms_batch1: float
    decode_ms_batched: float
    decode_batch: int
    peak_gpu_gib: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in _unique_params(model))


def decode_bytes_per_step(model: nn.Module) -> int:
    """Bytes of weights read per decode step: everything but the input embedding (unless tied)."""
    hf: Any = model  # a transformers PreTrainedModel
    embedding = hf.get_input_embeddings().weight
    output = hf.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    skip = 0 if tied else embedding.numel() * embedding.element_size()
    return weight_bytes(model) - skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill_throughput(
    model: nn.Module, batch: int, seq_len: int, repeats: int = 3, dtype: torch.dtype | None = None
) -> float:
    device = next(model.parameters()).device
    config: Any = model.config
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
    with autocast_for(model, dtype):
        model(input_ids=ids, use_cache=False)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=ids, use_cache=False)
        _sync(device)
    return batch * seq_len * repeats / (time.perf_counter() - t0)


def _compiled_step(model: nn.Module) -> Callable:
    """``model.forward`` replayed as CUDA graphs: torch.compile(mode="reduce-overhead"), the
    transformers static-cache recipe (about a minute to compile per model and batch size at 8B).

    Every model and batch size is one more compiled variant, so the recompile limit is raised (at
    the default limit dynamo silently falls back to eager), and shapes stay static.  Measured on an
    H100: dynamo's plain "cudagraphs" backend ran an 8B decode step at eager speed (21 ms vs 7 ms).
    """
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(64, getattr(dynamo_config, name)))
    dynamo_config.automatic_dynamic_shapes = False  # each width compiles static kernels, as in deployment
    return torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)


@torch.no_grad()
def decode_latency(
    model: nn.Module,
    batch: int,
    prompt_len: int = 64,
    new_tokens: int = 64,
    dtype: torch.dtype | None = None,
    graphs: bool | None = None,
) -> float:
    """Mean milliseconds per decode step (greedy, static KV cache) after a warm-up.

    graphs (default: on CUDA): replay the step as CUDA graphs, so the number measures the GPU
    rather than Python kernel launches.
    """
    from transformers import StaticCache

    device = next(model.parameters()).device
    graphs = device.type == "cuda" if graphs is None else graphs
    step = _compiled_step(model) if graphs else model.forward
    config: Any = model.config
    ids = torch.randint(0, config.vocab_size, (batch, prompt_len), device=device)
    cache = StaticCache(config=config, max_cache_len=prompt_len + new_tokens + 1)
    with_cache = {cache_keyword(model): cache}

    def run(n: int) -> float:
        cache.reset()  # same tensors every run: the graph captured in the warm-up is replayed
        with autocast_for(model, dtype):
            out = model(input_ids=ids, use_cache=True, **with_cache)
            token = out.logits[:, -1:].argmax(-1)
            positions = torch.arange(prompt_len, prompt_len + n, device=device)
            _sync(device)
            t0 = time.perf_counter()
            for i in range(n):
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                out = step(input_ids=token, cache_position=positions[i : i + 1], use_cache=True, **with_cache)
                token = out.logits[:, -1:].argmax(-1)
            _sync(device)
        return (time.perf_counter() - t0) / n * 1000

    run(new_tokens)  # warm-up (compilation and graph capture on CUDA)
    return run(new_tokens)


def cache_keyword(model: nn.Module) -> str:
    """The forward keyword for the KV cache: ``cache`` where transformers has renamed it (its old
    name ``past_key_values`` is deprecated there, to be removed in 5.40), else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def measure(
    model: nn.Module,
    prefill_batch: int = 4,
    prefill_len: int = 512,
    decode_batch: int = 16,
    new_tokens: int = 64,
    dtype: torch.dtype | None = None,
) -> SpeedResult:
    """Speed of one model; peak_gpu_gib counts its weights and what its runs allocate, not other
    tensors already resident (e.g. the dense model kept for comparison in the same process)."""
    device = next(model.parameters()).device
    resident_other = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        resident_other = torch.cuda.memory_allocated(device) - weight_bytes(model)
    result = SpeedResult(
        parameters=sum(p.numel() for p in _unique_params(model)),
        weight_bytes=weight_bytes(model),
        decode_bytes=decode_bytes_per_step(model),
        prefill_tokens_per_s=prefill_throughput(model, prefill_batch, prefill_len, dtype=dtype),
        decode_ms_batch1=decode_latency(model, 1, new_tokens=new_tokens, dtype=dtype),
        decode_ms_batched=decode_latency(model, decode_batch, new_tokens=new_tokens, dtype=dtype),
        decode_batch=decode_batch,
    )
    if device.type == "cuda":
        result.peak_gpu_gib = (torch.cuda.max_memory_allocated(device) - resident_other) / 2**30
    return result


def compare(dense: nn.Module, pruned: nn.Module, **kwargs) -> dict:
    """Measure both models in one process; speedups and the memory-bound decode limit."""
    return compare_results(measure(dense, **kwargs), measure(pruned, **kwargs))


def compare_results(d: SpeedResult, p: SpeedResult) -> dict:
    """Ratios of two measurements taken in the same process (dense measured once, many pruned)."""
    return {
        "dense": d.to_dict(),
        "pruned": p.to_dict(),
        "prefill_speedup": p.prefill_tokens_per_s / d.prefill_tokens_per_s,
        "decode_speedup_batch1": d.decode_ms_batch1 / p.decode_ms_batch1,
        "decode_speedup_batched": d.decode_ms_batched / p.decode_ms_batched,
        "byte_ratio_limit": d.decode_bytes / p.decode_bytes,
        "weight_memory_ratio": p.weight_bytes / d.weight_bytes,
    }


def format_comparison(c: dict) -> str:
    d, p = c["dense"], c["pruned"]
    lim = c["byte_ratio_limit"]
    rows = [
        ("parameters (M)", d["parameters"] / 1e6, p["parameters"] / 1e6, p["parameters"] / d["parameters"]),
        ("weight memory (MiB)", d["weight_bytes"] / 2**20, p["weight_bytes"] / 2**20, c["weight_memory_ratio"]),
        ("prefill tokens/s", d["prefill_tokens_per_s"], p["prefill_tokens_per_s"], c["prefill_speedup"]),
        ("decode ms/token, batch 1", d["decode_ms_batch1"], p["decode_ms_batch1"], c["decode_speedup_batch1"]),
        (
            f"decode ms/step, batch {d['decode_batch']}",
            d["decode_ms_batched"],
            p["decode_ms_batched"],
            c["decode_speedup_batched"],
        ),
    ]
    lines = [f"{'':28s} {'dense':>12s} {'pruned':>12s} {'ratio':>8s}"]
    lines += [f"{name:28s} {a:12.2f} {b:12.2f} {r:8.3f}" for name, a, b, r in rows]
    lines.append(
        f"byte-ratio limit (dense/pruned bytes per decode step): {lim:.3f}; decode speedup reaches "
        f"{c['decode_speedup_batch1'] / lim:.2f} (batch 1) and {c['decode_speedup_batched'] / lim:.2f} (batched) of it"
    )
    return "\n".join(lines)
