"""Perplexity with one decoder layer in memory: the windows travel through the layers, not the weights
through the windows.

The windows are split into chunks whose hidden states (n x seq_len x hidden, float32, input and
output of a layer) fit in ``max_hidden_bytes``. For each chunk the embeddings run once, then each
decoder layer is read from the safetensors shards, applied to every batch of the chunk and freed; the
decoder's own forward then applies its final norm to the last layer's outputs (the layers replaced by
a replay of those outputs), and the output head scores them in slices. Each operation is the one
``perplexity`` runs on the whole model (float32 weights, matmuls under autocast in ``dtype``), so the
result is the same; peak memory is one layer, the embeddings, the head and one chunk's states.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..io.shards import SafetensorsCheckpoint
from ..runtime.host_malloc import fix_mmap_threshold
from ..runtime.layerwise import LayerInputs, capture_layer_inputs, compute_copy, run_layer
from ..runtime.meta import WORK_DTYPE, StreamedLayers, module_name, open_streamed, set_tensor, to_meta
from .perplexity import PerplexityResult, check_score_from, sliced_nll, text_windows


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """Matmuls in ``dtype`` over float32 weights, as ``autocast_for`` does for an in-memory model."""
    enabled = dtype is not None and dtype != WORK_DTYPE
    return torch.autocast(device_type=device.type, dtype=dtype or WORK_DTYPE, enabled=enabled)


@contextmanager
def _replayed(layers: nn.ModuleList, outputs: Iterator[Tensor]) -> Iterator[None]:
    """The first layer returns the next recorded output and the others pass it on, so a forward of
    the decoder computes only what lies outside its layers (embeddings, final norm)."""

    def first(*_args: Any, **_kwargs: Any) -> Tensor:
        return next(outputs)

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        return args[0] if args else kwargs["hidden_states"]

    for i, layer in enumerate(layers):
        layer.forward = first if i == 0 else passthrough
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


@torch.no_grad()
def streamed_perplexity(
    path: str | Path,
    tokenizer: Any,
    text: str,
    seq_len: int = 2048,
    batch_size: int = 2,
    dtype: torch.dtype | None = None,
    max_windows: int | None = None,
    score_from: int = 0,
    device: str | torch.device = "cpu",
    max_hidden_bytes: int = 2**29,
    max_logits_bytes: int = 2**28,
    progress: bool = True,
) -> PerplexityResult:
    """``perplexity`` of the safetensors checkpoint ``path``, reading one decoder layer at a time.
    Fixes this process's glibc mmap threshold, as out-of-core pruning does (``runtime.host_malloc``)."""
    check_score_from(score_from, seq_len)
    fix_mmap_threshold()  # layer-sized tensors in mappings of their own: the peak does not grow with depth
    device = torch.device(device)
    model, source = open_streamed(path)
    streamed = StreamedLayers(model, source)
    layers = streamed.layers
    windows = text_windows(tokenizer, text, seq_len, max_windows)
    hidden_size = model.get_input_embeddings().weight.shape[1]
    per_chunk = max(1, max_hidden_bytes // (2 * seq_len * hidden_size * 4) // batch_size) * batch_size
    total_nll, total_tokens = 0.0, 0
    chunks = range(0, windows.shape[0], per_chunk)
    bar = tqdm(total=len(chunks) * len(layers), desc=f"ppl@{seq_len} (streamed)", unit="layer", disable=not progress)
    for start in chunks:
        ids = windows[start : start + per_chunk]
        with streamed.capture():
            inputs = capture_layer_inputs(model, layers, ids, batch_size, device, WORK_DTYPE)
        for index in range(len(layers)):
            streamed.load(index)
            with _autocast(device, dtype):
                inputs = run_layer(compute_copy(layers[index], device, WORK_DTYPE), inputs, device, WORK_DTYPE)
            streamed.release(index, write=False)
            bar.update()
        final = _final_hidden_states(model, streamed, inputs, ids, batch_size, device, dtype)
        with _materialised_head(model, streamed.source, dtype) as head_model, _autocast(device, dtype):
            for batch, hidden in zip(ids.split(batch_size), final):
                hidden = hidden[:, score_from:-1].to(device)
                targets = batch[:, score_from + 1 :].reshape(-1).to(device)
                total_nll += sliced_nll(head_model, hidden.reshape(-1, hidden.shape[-1]), targets, max_logits_bytes)
                total_tokens += targets.numel()
    bar.close()
    nll = total_nll / total_tokens
    used = str(dtype or WORK_DTYPE).replace("torch.", "")
    return PerplexityResult(math.exp(nll), nll, seq_len, windows.shape[0], total_tokens, used, score_from)


def _final_hidden_states(
    model: Any,
    streamed: StreamedLayers,
    inputs: LayerInputs,
    ids: Tensor,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> list[Tensor]:
    """Per batch: the decoder's last hidden state (after its final norm) given the last layer's outputs."""
    outputs = (h.to(device, WORK_DTYPE) for h in inputs.hidden)
    final = []
    with streamed.capture(), _replayed(streamed.layers, outputs), _autocast(device, dtype):
        decoder = model.get_decoder()
        for batch in ids.split(batch_size):
            hidden = decoder(input_ids=batch.to(device), use_cache=False).last_hidden_state
            final.append(hidden.to("cpu"))
    return final


@contextmanager
def _materialised_head(model: Any, source: SafetensorsCheckpoint, dtype: torch.dtype | None) -> Iterator[Any]:
    """``model`` with its output head (tied or not) read from ``source``, freed after: in float32, or
    in its stored dtype where that is the matmul dtype (autocast would round float32 to it anyway)."""
    head = model.get_output_embeddings()
    tied = head.weight is model.get_input_embeddings().weight
    head_name = module_name(model, head)
    table = f"{module_name(model, model.get_input_embeddings())}.weight" if tied else f"{head_name}.weight"
    names = {table: "weight"} | ({f"{head_name}.bias": "bias"} if getattr(head, "bias", None) is not None else {})
    for stored, tensor in source.read(names).items():
        set_tensor(head, names[stored], tensor if tensor.dtype == dtype else tensor.to(WORK_DTYPE))
    try:
        yield model
    finally:
        to_meta(head)
        model.tie_weights()
