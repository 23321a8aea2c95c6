"""Safetensors checkpoints one tensor at a time: a lazy reader over shards and an incremental sharded writer.

The reader maps tensor names to shard files (``model.safetensors.index.json`` or a single
``model.safetensors``) and opens a shard only while tensors are read from it, so no mapping of the
whole checkpoint stays resident. The writer buffers tensors up to ``max_shard_bytes``, writes each
full buffer as one shard, and at ``close`` names the shards ``model-0000i-of-0000n.safetensors``
with the index transformers and vLLM read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


class CheckpointError(ValueError):
    """A checkpoint whose files are incomplete, corrupt, or do not match its config.json."""


def non_finite_message(directory: str | Path, name: str) -> str:
    return f"{directory}: tensor {name} holds NaN or inf values; the checkpoint is corrupt: copy it again"


def all_finite(tensor: Tensor, block_elements: int = 1 << 22) -> bool:
    """No NaN or inf in ``tensor``, checked ``block_elements`` at a time: ``isfinite`` of a whole
    embedding table would allocate its temporaries at the table's size (1.4 GiB for a 151k x 1536
    bf16 table, the peak of a streamed Qwen2.5-Coder-1.5B run)."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + block_elements]).all()) for i in range(0, flat.numel(), block_elements))


@contextmanager
def _open(file: Path) -> Iterator[Any]:
    """``safe_open`` whose failure to read the header names the file."""
    try:
        handle = safe_open(str(file), framework="pt")
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError
        if isinstance(exc, OSError) and not file.exists():
            raise
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({exc}): truncated or corrupt, copy it again"
        ) from None
    with handle as f:
        yield f


class SafetensorsCheckpoint:
    """Read tensors of a checkpoint directory by name, without loading the rest."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(
                    f"{index} is not a safetensors index ({exc!r}); copy the checkpoint again"
                ) from None
            absent = sorted(set(weight_map.values()) - {p.name for p in self.directory.iterdir()})
            if absent:
                raise CheckpointError(
                    f"{self.directory} lacks {len(absent)} shard(s) its index names, e.g. {absent[0]}"
                )
        elif (self.directory / SINGLE_FILE).is_file():
            with _open(self.directory / SINGLE_FILE) as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
        elif shards := sorted(self.directory.glob("model-*-of-*.safetensors")):
            raise FileNotFoundError(
                f"{self.directory} has safetensors shards ({shards[0].name}, ...) but no {INDEX_FILE}; "
                "copy the index file with them"
            )
        else:
            raise FileNotFoundError(
                f"{self.directory} holds no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}); spap streams "
                "safetensors checkpoints: re-save the model with save_pretrained(safe_serialization=True)"
            )
        self.weight_map = weight_map

    def names(self) -> set[str]:
        return set(self.weight_map)

    def read(self, names: Iterable[str]) -> dict[str, Tensor]:
        """The named tensors, in their stored dtype; each shard is opened once and closed after.
        A floating-point tensor holding NaN or inf is refused (``CheckpointError``)."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise CheckpointError(f"{self.directory}: the checkpoint has no tensor {name!r}")
            by_file.setdefault(self.weight_map[name], []).append(name)
        out: dict[str, Tensor] = {}
        for file, wanted in by_file.items():
            with _open(self.directory / file) as f:
                for name in wanted:
                    out[name] = f.get_tensor(name)
                    if out[name].is_floating_point() and not all_finite(out[name]):
                        raise CheckpointError(non_finite_message(self.directory, name))
        return out

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every stored tensor, read from the shard headers (no tensor data)."""
        return {name: shape for name, (shape, _) in self._headers().items()}

    def _headers(self) -> dict[str, tuple[tuple[int, ...], str]]:
        out = {}
        for file in sorted(set(self.weight_map.values())):
            with _open(self.directory / file) as f:
                for name in f.keys():
                    view = f.get_slice(name)
                    out[name] = (tuple(view.get_shape()), view.get_dtype())
        return out

    def float_elements(self) -> int:
        """Number of floating-point tensor elements, read from the shard headers (no tensor data)."""
        return sum(math.prod(shape) for shape, dtype in self._headers().values() if dtype.startswith(("F", "BF")))

    def float32_elements(self) -> int:
        """Number of elements stored in float32 (read from the shard headers): transformers uses such
        tensors in place from the mapped files when it loads the model in float32."""
        return sum(math.prod(shape) for shape, dtype in self._headers().values() if dtype == "F32")

    def stored_dtype(self) -> torch.dtype:
        """The dtype of the first floating-point tensor (the checkpoint's storage dtype)."""
        for name in sorted(self.weight_map):
            tensor = self.read([name])[name]
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32


class ShardWriter:
    """Write tensors into ``directory`` as shards of at most ``max_shard_bytes`` (a larger single group
    gets a shard of its own), optionally cast to ``dtype``; ``close`` writes the index."""

    def __init__(self, directory: str | Path, max_shard_bytes: int = 2**30, dtype: torch.dtype | None = None) -> None:
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.dtype = dtype
        self._buffer: dict[str, Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []  # tensor names per written shard
        self.total_bytes = 0

    def add(self, tensors: dict[str, Tensor], owned: bool = False) -> None:
        """Queue a group of tensors (e.g. one decoder layer); a group is never split across shards.
        Each is kept in storage of its own (no views of tied or pruned weights): a cast makes that
        copy; ``owned`` says the tensors are the caller's to give away (e.g. just read from a file), so
        one that covers its whole storage needs none."""
        group = {name: self._stored(t, owned) for name, t in tensors.items()}
        size = sum(t.numel() * t.element_size() for t in group.values())
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer.update(group)
        self._buffer_bytes += size
        self.total_bytes += size
        if self._buffer_bytes >= self.max_shard_bytes:
            self._flush()

    def add_rows(self, name: str, shape: tuple[int, ...], chunks: Iterable[Tensor]) -> None:
        """Write one tensor of ``shape`` into a shard of its own from ``chunks``, consecutive row blocks
        (each (r, *shape[1:])), never holding it whole: the safetensors header is known from the
        shape, and the rows follow it in order (the format's layout: an 8-byte header length, the
        JSON header, the row-major bytes)."""
        self._flush()
        dtype = self.dtype or torch.float32
        nbytes = math.prod(shape) * dtype.itemsize
        entry = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [0, nbytes]}
        header = json.dumps({"__metadata__": {"format": "pt"}, name: entry}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        written = 0
        with open(self._part(len(self._shards)), "wb") as file:
            file.write(struct.pack("<Q", len(header)) + header)
            for chunk in chunks:
                rows = chunk.detach().to("cpu", dtype).contiguous()
                if tuple(rows.shape[1:]) != tuple(shape[1:]):
                    raise ValueError(f"{name}: a row block of shape {tuple(rows.shape)} for a tensor of {shape}")
                file.write(rows.view(torch.uint8).numpy().data)
                written += rows.numel() * dtype.itemsize
        if written != nbytes:
            raise ValueError(f"{name}: the row blocks hold {written} bytes, the shape {shape} needs {nbytes}")
        self._shards.append([name])
        self.total_bytes += nbytes

    def _stored(self, tensor: Tensor, owned: bool) -> Tensor:
        stored = tensor.detach()
        if self.dtype is not None and stored.is_floating_point():
            stored = stored.to(self.dtype)
        stored = stored.to("cpu").contiguous()
        fresh = stored.data_ptr() != tensor.data_ptr()  # the cast or move above allocated it
        if fresh or (owned and tensor.untyped_storage().nbytes() == stored.nbytes):
            return stored
        return stored.clone()

    def _flush(self) -> None:
        if not self._buffer:
            return
        save_file(self._buffer, str(self._part(len(self._shards))), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def _part(self, index: int) -> Path:
        return self.directory / f".part-{index:05d}.safetensors"

    def close(self) -> list[str]:
        """Write what is buffered, name the shards as transformers does, write the index (more than
        one shard) and return the file names."""
        self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self._part(0), self.directory / SINGLE_FILE)
            return [SINGLE_FILE]
        files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for i, (file, names) in enumerate(zip(files, self._shards)):
            os.replace(self._part(i), self.directory / file)
            weight_map.update(dict.fromkeys(names, file))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return files


def verify_tensors(source: SafetensorsCheckpoint, model: nn.Module) -> None:
    """Refuse (``CheckpointError``) a checkpoint whose stored tensors are not the ones ``model`` (built
    from its config.json, e.g. on the meta device) has: missing, unexpected, or of another shape.
    Tied tensors may be stored under any of their names."""
    state = model.state_dict(keep_vars=True)
    expected = {name: tuple(t.shape) for name, t in state.items()}
    groups: dict[int, list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(id(tensor), []).append(name)
    stored = source.shapes()
    missing = [names[0] for names in groups.values() if not any(n in stored for n in names)]
    unexpected = sorted(set(stored) - set(expected))
    wrong = [
        f"{n} is {list(stored[n])}, the config says {list(expected[n])}"
        for n in expected
        if n in stored and stored[n] != expected[n]
    ]
    check_tensor_names(source.directory, missing, unexpected, wrong)


def check_tensor_names(directory: str | Path, missing: list[str], unexpected: list[str], wrong: list[str]) -> None:
    """Raise ``CheckpointError`` naming how many tensors are missing, unexpected or of another shape
    (with an example of each), if any are."""
    problems = [
        f"{len(items)} {what} (e.g. {items[0]})"
        for what, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong))
        if items
    ]
    if problems:
        raise CheckpointError(
            f"{directory}: the tensors do not match config.json: {'; '.join(problems)}; the checkpoint is "
            "incomplete or its config.json was changed: copy it again"
        )
