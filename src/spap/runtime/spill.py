"""Calibration activations on disk: per-batch buffers written once and read back when a pass needs them.

The layer-by-layer pipeline keeps n x seq_len x hidden activations per buffer (a layer's inputs, its
recorded attention outputs, its outputs). Inside ``spilling(directory)`` every such buffer is a
``SpilledBatches``: each appended batch is written to its own file and read back on access, so host
memory holds the batches in use, not the buffer. Reads come from the page cache while it holds them.
"""

from __future__ import annotations

import errno
import itertools
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch

from ..io.atomic import owned_tempdir, remove_dead_leftovers

SPILL_PREFIX = "spap-activations-"
_directory: ContextVar[Path | None] = ContextVar("spap_spill_directory", default=None)
_counter = itertools.count()


class SpilledBatches:
    """A list of per-batch objects (tensors, tuples of tensors) stored in files under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: list[Path] = []

    def append(self, value: Any) -> None:
        path = self.directory / f"batch-{next(_counter):08d}.pt"
        try:
            torch.save(_compact(value), path)
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as "[enforce fail at ...]"
            path.unlink(missing_ok=True)
            raise _write_failure(self.directory, exc) from exc
        self._files.append(path)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> Any:
        return torch.load(self._files[index], weights_only=True)

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))

    def __del__(self) -> None:
        for path in self._files:
            path.unlink(missing_ok=True)


def _write_failure(directory: Path, exc: BaseException) -> OSError:
    """The error to report for a failed activation write: ENOSPC when the disk is (nearly) full."""
    try:
        full = shutil.disk_usage(directory).free < 2**26
    except OSError:
        full = False
    advice = "set TMPDIR to a directory with more space, or raise --max-host-memory to keep activations in memory"
    if full or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
        return OSError(errno.ENOSPC, f"no space left for calibration activations in {directory.parent}; {advice}")
    return OSError(f"could not write calibration activations to {directory} ({exc}); {advice}")


def _compact(value: Any) -> Any:
    """``value`` with every tensor view replaced by a copy (torch.save writes a view's whole storage)."""
    if isinstance(value, torch.Tensor):
        owns = value.untyped_storage().nbytes() == value.numel() * value.element_size()
        return value if owns else value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_compact(v) for v in value)
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items()}
    return value


def batch_buffer() -> Any:
    """A new per-batch activation buffer: a list, or ``SpilledBatches`` inside ``spilling``."""
    directory = _directory.get()
    return [] if directory is None else SpilledBatches(directory)


@contextmanager
def spilling(parent: str | Path | None = None) -> Iterator[Path]:
    """Buffers made by ``batch_buffer`` in this context live in a temporary directory under ``parent``
    (default: the system's temporary directory, $TMPDIR), removed on exit; directories that killed
    runs left there are removed first."""
    parent = Path(parent or tempfile.gettempdir())
    remove_dead_leftovers(parent, SPILL_PREFIX)
    directory = owned_tempdir(SPILL_PREFIX, parent)
    token = _directory.set(directory)
    try:
        yield directory
    finally:
        _directory.reset(token)
        shutil.rmtree(directory, ignore_errors=True)


def activation_bytes(n_sequences: int, seq_len: int, hidden_size: int, dtype: torch.dtype, buffers: int = 3) -> int:
    """Host bytes of ``buffers`` calibration activation buffers (n x seq_len x hidden in ``dtype``)."""
    return buffers * n_sequences * seq_len * hidden_size * torch.empty((), dtype=dtype).element_size()
