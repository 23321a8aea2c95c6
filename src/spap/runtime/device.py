"""Device, dtype, memory and version helpers shared by the pipeline, CLI and benchmarks."""

from __future__ import annotations

import ctypes
import functools
import gc
import platform
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_for(model: torch.nn.Module, dtype: torch.dtype | None):
    """Autocast context running matmuls in ``dtype`` while weights keep their precision."""
    param = next(model.parameters())
    if dtype is None or dtype == param.dtype:
        return nullcontext()
    return torch.autocast(device_type=param.device.type, dtype=dtype)


def resolve_device(name: str = "auto") -> torch.device:
    """The compute device, with its index ("cuda" -> "cuda:0"), so it compares equal to ``tensor.device``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def planned_device(name: str = "auto") -> torch.device:
    """The device a run with ``--device name`` would compute on, for planning: as ``resolve_device``,
    except that a named device need not be here (``spap prune --dry-run --device cuda`` on a laptop)."""
    return resolve_device(name) if name == "auto" else torch.device(name)


def gpu_memory_gib(name: str) -> float | None:
    """Total memory (GiB) of the CUDA device ``name`` resolves to; None off CUDA or without one here."""
    if planned_device(name).type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(resolve_device(name)).total_memory / 2**30


def dtype_name(name: str, device: str | torch.device) -> str:
    """``name`` with "auto" resolved for ``device`` (``resolve_dtype``), e.g. "bfloat16" or "float32"."""
    return str(resolve_dtype(name, torch.device(device))).removeprefix("torch.")


_EARLIER_GPU_PEAK: dict[torch.device, int] = {}
"""Per device, the peak allocated bytes before the last ``phase_peak`` reset the CUDA counter."""


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        _EARLIER_GPU_PEAK.pop(device, None)
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_bytes(device: torch.device) -> int:
    """Peak allocated GPU bytes since ``reset_peak_memory``, across ``phase_peak``'s resets."""
    return max(_EARLIER_GPU_PEAK.get(device, 0), torch.cuda.max_memory_allocated(device))


@contextmanager
def phase_peak(device: torch.device, into: dict[str, float], name: str) -> Iterator[None]:
    """Record in ``into[name]`` the peak allocated GPU memory (GiB) while the block runs (the largest
    over repeated blocks of one name). Off CUDA, under a ``TensorMeter`` (``tensor_meter.metering``),
    the most tensor bytes alive at once instead (what a GPU would hold); else nothing. The run's
    overall peak is kept."""
    if device.type != "cuda":
        from .tensor_meter import active_meter

        meter = active_meter()
        if meter is None:
            yield
            return
        with meter.phase(name):
            yield
        into[name] = meter.phases[name] / 2**30
        return
    _EARLIER_GPU_PEAK[device] = gpu_peak_bytes(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        into[name] = max(into.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)


def peak_rss_gib() -> float:
    """Peak RSS of this process image (GiB): Linux's VmHWM. ``ru_maxrss`` also counts the parent's
    peak at the time it started this program (Linux keeps it across exec): a CLI run from a large
    Python process (a test suite) reported that process's 0.64 GiB as its own."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 2**20
    except (OSError, IndexError, ValueError):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak process RSS (GiB, since process start) and, on CUDA, peak allocated GPU memory (GiB)."""
    out = {"peak_rss_gib": peak_rss_gib()}
    if device.type == "cuda":
        out["peak_gpu_gib"] = gpu_peak_bytes(device) / 2**30
    return out


@functools.lru_cache(maxsize=1)
def glibc() -> ctypes.CDLL | None:
    """The C library on Linux with glibc, else None (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # no libc.so.6 (e.g. musl)
        return None


def release_host_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim(0)``).

    Layer-wise passes free large activation buffers every layer; glibc keeps them mapped, so without
    this the process RSS carries the high-water mark of earlier passes (measured on SmolLM2: +0.65 GiB
    after the allocation probe pass, none of it live tensors)."""
    gc.collect()
    trim = getattr(glibc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def versions() -> dict[str, str]:
    import transformers

    from .. import __version__

    return {
        "spap": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_threads": str(torch.get_num_threads()),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
    }
