"""The few lines ``spap prune`` prints at the end: quality, size, speed and how to load the result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

QUICK_SPEED = {"prefill_batch": 1, "prefill_len": 256, "decode_batch": 4, "new_tokens": 16}
"""Sizes of the end-of-run speed check (a few seconds on a 135M model on 2 CPU cores); ``spap bench``
measures at full size."""


def quick_speed(dense_path: str, pruned_dir: Path, device: str) -> dict[str, Any]:
    """Dense vs pruned prefill/decode ratios measured now, both loaded from disk in bfloat16 where the
    device runs it fast, else float32 (``dtype_name``)."""
    from ..evaluation.speed import compare
    from ..io.models import load_model
    from ..runtime.device import dtype_name

    dtype = dtype_name("auto", device)
    dense, _, _ = load_model(dense_path, dtype=dtype, device=device)
    pruned, _, _ = load_model(str(pruned_dir), dtype=dtype, device=device)
    return {**compare(dense, pruned, **QUICK_SPEED), "sizes": QUICK_SPEED, "device": device, "dtype": dtype}


def _short(dtype: str) -> str:
    return {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}.get(dtype, dtype)


def _bytes_on_disk(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def _heads_resized_qwen2(out_dir: Path) -> bool:
    from ..io.llamacpp import heads_resized_qwen2

    config = out_dir / "config.json"
    return config.is_file() and heads_resized_qwen2(json.loads(config.read_text()))


def format_summary(
    out_dir: Path, report: dict[str, Any], metrics: dict[str, Any], speed: dict[str, Any] | None, stock: bool
) -> str:
    """Dense vs pruned perplexity, parameters, bytes on disk, speed ratios, location and loader."""
    before, after = report["parameters_before"], report["parameters_after"]
    lines = ["", "summary"]
    for source, dense in metrics.get("dense", {}).items():
        pruned = metrics["pruned"][source]
        name = "bundled held-out text" if source == "bundled-heldout" else Path(source).name
        lines.append(
            f"  perplexity      {dense['perplexity']:.2f} -> {pruned['perplexity']:.2f}  "
            f"({name}, seq_len {pruned['seq_len']}, {pruned['n_windows']} windows)"
        )
    lines.append(f"  parameters      {before / 1e6:.1f}M -> {after / 1e6:.1f}M  ({1 - after / before:.1%} fewer)")
    lines.append(f"  on disk         {_bytes_on_disk(out_dir) / 2**20:.0f} MiB ({report.get('save_dtype', '')})")
    if speed is not None:
        lines.append(
            f"  speed (pruned/dense, quick check on {speed['device']}, {_short(speed.get('dtype', 'bfloat16'))})  prefill x{speed['prefill_speedup']:.2f}, "
            f"decode x{speed['decode_speedup_batch1']:.2f}  (full benchmark: spap bench)"
        )
    lines.append(f"  prune time      {report['seconds']['total']:.0f} s")
    lines.append(f"  checkpoint      {out_dir}")
    if stock:
        vllm = "vLLM" if not _heads_resized_qwen2(out_dir) else f"vLLM: spap export {out_dir} --format decilm"
        lines.append(
            f'  load            AutoModelForCausalLM.from_pretrained("{out_dir}")  (stock transformers, {vllm})'
        )
    else:
        lines.append(
            f'  load            spap.load_pretrained("{out_dir}")  (per-layer shapes; or trust_remote_code=True)'
        )
    return "\n".join(lines)
