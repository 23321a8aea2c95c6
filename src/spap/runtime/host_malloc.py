"""glibc's heap and layer-by-layer runs.

glibc serves an allocation of at least its mmap threshold with a mapping of its own, returned to the
system when freed. The threshold starts at 128 KiB and rises (up to 32 MiB) each time such a block is
freed, after which tensors of a few MiB (a layer's weights, a chunk of hidden states) come from the
heap, which fragments and is not given back: a layer-by-layer run's peak RSS then creeps up with its
depth. A fixed threshold keeps every such tensor in its own mapping.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
THRESHOLD_BYTES = 1 << 20  # tensors of 1 MiB and more get their own mapping
ENV = "MALLOC_MMAP_THRESHOLD_"  # glibc's own variable: set by the user, it wins


def fix_mmap_threshold(threshold: int = THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process (its dynamic raising off);
    True when set. Nothing is changed off Linux/glibc, or when the user set ``MALLOC_MMAP_THRESHOLD_``."""
    if not sys.platform.startswith("linux") or ENV in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another libc
        return False
    mallopt = getattr(libc, "mallopt", None)
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, threshold))
