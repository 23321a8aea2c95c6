"""Live tensor bytes on any device: what a run would hold on an accelerator, measured on a CPU.

``TensorMeter`` counts the storage of every tensor that torch operations create while it is active,
until the last tensor or view using that storage dies. Run on a CPU with the compute device's dtypes,
it measures what the same code allocates on a GPU (``torch.cuda.max_memory_allocated`` counts the
same storages, rounded up to 512 bytes), without one. Not counted: library workspaces (LAPACK,
cuBLAS, cuSOLVER), storages that existed before the meter started, and Python objects."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMeter(TorchDispatchMode):
    """Bytes of the tensor storages created under the meter and still alive (``live``), their most
    at once (``peak``), and the most at once inside each named ``phase``."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.phases: dict[str, int] = {}
        self._open: dict[str, int] = {}  # open phase -> its peak so far
        self._sizes: dict[int, int] = {}  # data pointer -> bytes, of the counted storages alive

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {_pointer(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._count(tensor, inputs)
        return out

    def _count(self, tensor: torch.Tensor, inputs: set[int | None]) -> None:
        pointer = _pointer(tensor)
        if pointer is None or pointer in inputs or pointer in self._sizes:  # a view, in place, or counted
            return
        storage = tensor.untyped_storage()
        size = storage.nbytes()
        if size == 0:
            return
        self._sizes[pointer] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        for name, most in self._open.items():
            self._open[name] = max(most, self.live)
        weakref.finalize(storage, self._free, pointer)

    def _free(self, pointer: int) -> None:
        self.live -= self._sizes.pop(pointer, 0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record in ``phases[name]`` the most bytes alive at once while the block runs (the largest
        over repeated blocks of one name)."""
        self._open[name] = max(self._open.get(name, 0), self.live)
        try:
            yield
        finally:
            self.phases[name] = max(self.phases.get(name, 0), self._open.pop(name))


def _pointer(tensor: torch.Tensor) -> int | None:
    """The address of ``tensor``'s storage; None for tensors without one (meta, sparse, wrappers)."""
    if tensor.device.type == "meta" or tensor.layout != torch.strided:
        return None
    try:
        return tensor.untyped_storage().data_ptr()
    except (NotImplementedError, RuntimeError):
        return None


_ACTIVE: list[TensorMeter] = []


@contextmanager
def metering() -> Iterator[TensorMeter]:
    """Run the block under a new ``TensorMeter``; ``phase_peak`` then records its phases on any device."""
    meter = TensorMeter()
    _ACTIVE.append(meter)
    try:
        with meter:
            yield meter
    finally:
        _ACTIVE.remove(meter)


def active_meter() -> TensorMeter | None:
    return _ACTIVE[-1] if _ACTIVE else None
