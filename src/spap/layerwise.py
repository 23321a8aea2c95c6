"""Layer-by-layer execution: capture the first decoder layer's inputs, then run one layer at a time.

Only the layer being processed lives on the compute device; hidden states of all calibration
sequences are kept on the CPU (``offload``) in the compute dtype.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """Per-batch hidden states (B, S, d) and the keyword arguments the decoder layer received."""

    hidden: list[Tensor]
    kwargs: list[dict[str, Any]]

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _to(device: torch.device, dtype: torch.dtype | None = None) -> Callable[[Tensor], Tensor]:
    def fn(t: Tensor) -> Tensor:
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    return fn


@contextmanager
def non_layer_weights_on(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> Iterator[None]:
    """Temporarily move every parameter/buffer outside ``layers`` (embeddings, rotary, norms) to ``device``."""
    seen = {id(t) for t in layers.parameters()} | {id(t) for t in layers.buffers()}
    moved: list[tuple[nn.Module, str, str, torch.device]] = []
    for module in model.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(module, kind).items():
                if t is None or id(t) in seen:  # tied weights (embedding = lm_head) are moved once
                    continue
                seen.add(id(t))
                if t.device != device:
                    moved.append((module, kind, name, t.device))
                    if kind == "_parameters":
                        t.data = t.data.to(device)
                    else:
                        module._buffers[name] = t.to(device)
    try:
        yield
    finally:
        for module, kind, name, original in moved:
            t = getattr(module, kind)[name]
            if kind == "_parameters":
                t.data = t.data.to(original)
            else:
                module._buffers[name] = t.to(original)


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, ids: Tensor, batch_size: int, device: torch.device, dtype: torch.dtype
) -> LayerInputs:
    """Run the embeddings on ``ids`` (n, S) and record what ``layers[0]`` receives, batch by batch."""
    record = LayerInputs([], [])
    offload = torch.device("cpu")

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        record.hidden.append(hidden.to(offload, dtype))
        record.kwargs.append(_map_tensors(rest, _to(offload)))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with non_layer_weights_on(model, layers, device):
            for start in range(0, ids.shape[0], batch_size):
                batch = ids[start : start + batch_size].to(device)
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return record


def compute_copy(layer: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A copy of ``layer`` on ``device`` in ``dtype`` (the original keeps its precision)."""
    if next(layer.parameters()).device == device and next(layer.parameters()).dtype == dtype:
        return layer
    work = copy.deepcopy(layer)
    return work.to(device=device, dtype=dtype)


@torch.no_grad()
def run_layer(
    layer: nn.Module,
    inputs: LayerInputs,
    device: torch.device,
    dtype: torch.dtype,
    keep_outputs: bool = True,
    on_output: Callable[[int, Tensor], None] | None = None,
) -> LayerInputs:
    """Forward every batch through ``layer`` (already on device); outputs become the next layer's inputs.

    ``on_output(batch_index, output)`` is called after each batch (e.g. to finish per-batch statistics).
    """
    outputs: list[Tensor] = []
    for index, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs)):
        out = layer(hidden.to(device, dtype), **_map_tensors(kwargs, _to(device, dtype)))
        out = out[0] if isinstance(out, (tuple, list)) else out
        if on_output is not None:
            on_output(index, out)
        if keep_outputs:
            outputs.append(out.to("cpu", dtype))
    return LayerInputs(outputs, inputs.kwargs)
