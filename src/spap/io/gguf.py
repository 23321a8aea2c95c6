"""GGUF files to Hugging Face checkpoints, streamed: one tensor dequantised and written at a time.

transformers reads a GGUF file whole (``from_pretrained(gguf_file=...)``: every tensor dequantised to
float32 in memory, 8.7 GiB RSS for Qwen2.5-Coder-1.5B). Here the file is memory-mapped
(``gguf.GGUFReader``) and each tensor goes through the same steps transformers takes (its
dequantisation, its per-architecture ``TensorProcessor`` that undoes llama.cpp's layout, its name
map) straight into a ``ShardWriter``: peak memory is about the largest tensor, whatever the model.
"""

from __future__ import annotations

import logging
import math
import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic import atomic_directory
from .shards import CheckpointError, ShardWriter

log = logging.getLogger(__name__)


def convert_gguf(
    gguf_file: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 2**28
) -> Path:
    """Dequantise the GGUF checkpoint ``gguf_file`` into a safetensors checkpoint (weights in ``dtype``)
    with config, generation config and tokenizer in ``out_dir``, written atomically; a tensor the
    model needs and the file lacks is refused (``CheckpointError``)."""
    from accelerate import init_empty_weights
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    from ..runtime.meta import unique_state_names

    folder, name = str(gguf_file.parent), gguf_file.name
    try:  # a truncated or foreign file fails here with numpy's words ("cannot reshape array ...")
        reader = GGUFReader(gguf_file)
    except Exception as exc:  # noqa: BLE001 - ValueError, IndexError, struct.error, ...
        raise CheckpointError(
            f"{gguf_file} is not a readable GGUF file ({type(exc).__name__}: {exc}): truncated or corrupt, "
            "copy it again"
        ) from None
    log.info("converting %s to a Hugging Face checkpoint in %s", gguf_file, out_dir)
    parsed: dict[str, Any] = load_gguf_checkpoint(str(gguf_file), return_tensors=False)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised: a plain checkpoint
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    names = get_gguf_hf_weights_map(skeleton, processor)
    wanted = set(unique_state_names(skeleton))
    written: set[str] = set()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with atomic_directory(out_dir) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes, dtype)
        for tensor in tqdm(reader.tensors, desc=f"converting {name}", unit="tensor"):
            context = dict(tensor_key_mapping=names, parsed_parameters=parsed)
            if _by_rows(tensor, processor, context):  # e.g. the embeddings: never whole in memory
                key = names.get(tensor.name)
                if key in wanted:
                    rows = (_as_tensor(dequantize(block, tensor.tensor_type)) for block in _row_blocks(tensor))
                    writer.add_rows(key, _hf_shape(tensor), rows)
                    written.add(key)
            else:
                weights = dequantize(tensor.data, tensor.tensor_type)
                result = processor.process(weights=weights, name=tensor.name, **context)
                key = names.get(result.name)
                if key in wanted:
                    writer.add({key: _as_tensor(result.weights).to(dtype)}, owned=True)
                    written.add(key)
            _release_mapped_pages(reader)
        missing = sorted(wanted - written)
        if missing:
            raise CheckpointError(f"{gguf_file} lacks {len(missing)} tensors the model needs, e.g. {missing[0]}")
        writer.close()
        config.dtype = str(dtype).removeprefix("torch.")
        config.architectures = [type(skeleton).__name__]  # read by llama.cpp's converter and vLLM
        config.save_pretrained(tmp)
        if skeleton.can_generate():
            GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


ROW_BLOCK_BYTES = 2**26
"""Tensors larger than this as float32 are dequantised in row blocks of about this size."""


def _hf_shape(tensor: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists dimensions innermost first


def _row_blocks(tensor: Any) -> Iterator[np.ndarray]:
    """The tensor's stored rows (quantised bytes or floats) in blocks of about ROW_BLOCK_BYTES as float32."""
    rows, row_bytes = tensor.data.shape[0], 4 * math.prod(_hf_shape(tensor)[1:])
    step = max(1, ROW_BLOCK_BYTES // row_bytes)
    for start in range(0, rows, step):
        yield tensor.data[start : start + step]


def _by_rows(tensor: Any, processor: Any, context: dict[str, Any]) -> bool:
    """Whether to convert ``tensor`` row block by row block: it is large, a 2-D matrix stored row by
    row, and the architecture's processing leaves it as it is (checked on its first rows: llama.cpp
    layouts that processors undo, e.g. permuted q/k rows or transposed GPT-2 matrices, go whole)."""
    shape = _hf_shape(tensor)
    if len(shape) != 2 or 4 * math.prod(shape) <= ROW_BLOCK_BYTES or tensor.data.shape[0] != shape[0]:
        return False
    from gguf import dequantize

    probe = dequantize(tensor.data[:2], tensor.tensor_type)
    result = processor.process(weights=probe, name=tensor.name, **context)
    return result.name == tensor.name and result.weights is probe


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def _release_mapped_pages(reader: Any) -> None:
    """Drop the GGUF file's pages read so far from this process's resident set (the mapping is
    read-only; a page read again comes back from the page cache): without it the whole file counts in
    the peak RSS by the last tensor."""
    mapped = getattr(reader.data, "_mmap", None)  # numpy.memmap's mmap object
    if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)
