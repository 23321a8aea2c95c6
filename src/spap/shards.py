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
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsCheckpoint:
    """Read tensors of a checkpoint directory by name, without loading the rest."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.directory / SINGLE_FILE).is_file():
            with safe_open(str(self.directory / SINGLE_FILE), framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
        else:
            raise FileNotFoundError(
                f"{self.directory} has no {SINGLE_FILE} or {INDEX_FILE}; out-of-core pruning reads safetensors "
                "checkpoints (re-save the model with save_pretrained(safe_serialization=True))"
            )
        self.weight_map = weight_map

    def names(self) -> set[str]:
        return set(self.weight_map)

    def read(self, names: Iterable[str]) -> dict[str, Tensor]:
        """The named tensors, in their stored dtype; each shard is opened once and closed after."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise KeyError(f"{self.directory}: the checkpoint has no tensor {name!r}")
            by_file.setdefault(self.weight_map[name], []).append(name)
        out: dict[str, Tensor] = {}
        for file, wanted in by_file.items():
            with safe_open(str(self.directory / file), framework="pt") as f:
                for name in wanted:
                    out[name] = f.get_tensor(name)
        return out

    def float_elements(self) -> int:
        """Number of floating-point tensor elements, read from the shard headers (no tensor data)."""
        total = 0
        for file in sorted(set(self.weight_map.values())):
            with safe_open(str(self.directory / file), framework="pt") as f:
                for name in f.keys():
                    view = f.get_slice(name)
                    if view.get_dtype().startswith(("F", "BF")):
                        total += math.prod(view.get_shape())
        return total

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
