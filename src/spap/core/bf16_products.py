"""float32 matrix products of bfloat16-valued operands at the CPU's bfloat16 rate.

The product of two bfloat16 numbers (8-bit significands) is exact in float32 (24 bits).  So a
float32 matmul whose operands hold bfloat16 values (activations the model computed in bfloat16)
gives the float32 result, up to summation order, when oneDNN multiplies in bfloat16 and
accumulates in float32, as it does with ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``:
about 3-4x faster on CPUs with AVX512-BF16 or AMX.  On other operands that setting rounds them to
bfloat16 first, so it is only switched on around products whose operands are bfloat16 values.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions that oneDNN uses (Linux flags)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in _BF16_FLAGS)


@contextmanager
def bf16_rate_products(active: bool) -> Iterator[None]:
    """Within the block, CPU float32 matmuls multiply in bfloat16 and accumulate in float32, where
    this CPU has bfloat16 instructions (``cpu_multiplies_bf16``).

    Only exact for operands that are bfloat16 values: pass ``active`` False otherwise (the block
    then changes nothing).  The previous setting is restored on exit."""
    if not (active and cpu_multiplies_bf16()):
        yield
        return
    matmul = torch.backends.mkldnn.matmul  # type: ignore[attr-defined]  # a PropModule attribute set at import
    previous = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = previous
