"""Layer-by-layer execution: capture the first decoder layer's inputs, then run one layer at a time.

Only the layer being processed lives on the compute device; hidden states of all calibration
sequences are kept on the CPU (``offload``) in the compute dtype. The keyword arguments (masks,
position embeddings) are recorded for every distinct kind of layer, so models that mix full and
sliding-window attention (Gemma 2/3, Qwen2 with ``use_sliding_window``) give each layer its own
mask and rotary embeddings.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .spill import batch_buffer


class _StopForward(Exception):
    pass


class Residency(Protocol):
    """Where a model's weights live while it is pruned (see ``ResidentLayers``)."""

    def capture(self) -> Any: ...

    def load(self, index: int) -> None: ...

    def release(self, index: int, write: bool) -> None: ...


class ResidentLayers:
    """Where a model's weights live while it is pruned: here, all in memory, so nothing to do.

    ``offload.StreamedLayers`` implements the same three calls for out-of-core pruning: ``capture()``
    (a context in which the embeddings are materialised), ``load(i)`` before layer i is used and
    ``release(i, write)`` after it."""

    @contextmanager
    def capture(self) -> Iterator[None]:
        yield

    def load(self, index: int) -> None:
        pass

    def release(self, index: int, write: bool) -> None:
        pass


@dataclass
class LayerInputs:
    """Per-batch hidden states (B, S, d) of decoder layer ``layer_index`` and every layer's kwargs.

    ``kwargs_by_layer[i]`` is the per-batch kwargs list of layer i; layers that receive equal kwargs
    share one list, so a model with one kind of layer stores them once.
    """

    hidden: list[Tensor]
    kwargs_by_layer: list[list[dict[str, Any]]]
    layer_index: int = 0

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    @property
    def kwargs(self) -> list[dict[str, Any]]:
        """Per-batch kwargs of layer ``layer_index`` (the last layer's past the end; [] without batches)."""
        table = self.kwargs_by_layer
        return table[min(self.layer_index, len(table) - 1)] if table else []

    def next_layer(self, hidden: list[Tensor]) -> LayerInputs:
        """``hidden`` (this layer's outputs) as the inputs of layer ``layer_index + 1``."""
        return LayerInputs(hidden, self.kwargs_by_layer, self.layer_index + 1)


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
                if t is None or id(t) in seen or t.device.type == "meta":  # tied weights move once;
                    continue  # meta: not materialised (out-of-core pruning, e.g. the output head)
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


def _same(a: Any, b: Any) -> bool:
    """Structural equality of keyword arguments (tensors by value)."""
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and bool(torch.equal(a, b))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # objects without a usable ==
        return False


def _groups(per_layer: list[dict[str, Any]]) -> list[int]:
    """For each layer, the index of the first layer whose kwargs equal its own."""
    groups: list[int] = []
    for i, kwargs in enumerate(per_layer):
        groups.append(next((g for g in dict.fromkeys(groups) if _same(per_layer[g], kwargs)), i))
    return groups


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, ids: Tensor, batch_size: int, device: torch.device, dtype: torch.dtype
) -> LayerInputs:
    """Run the embeddings on ``ids`` (n, S) and record what the decoder layers receive, batch by batch.

    Every layer is replaced by a pass-through while the model runs, so no layer computes; the hidden
    states of ``layers[0]`` and the kwargs of each distinct kind of layer are kept.
    """
    offload = torch.device("cpu")
    hidden_states: list[Tensor] = batch_buffer()
    batch_kwargs: list[dict[str, Any]] = []  # this batch's kwargs of every layer (references)
    table: list[list[dict[str, Any]]] = []
    groups: list[int] | None = None

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not batch_kwargs:
            hidden_states.append((args[0] if args else kwargs["hidden_states"]).to(offload, dtype))
        batch_kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        if module is layers[-1]:
            raise _StopForward

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        return args[0] if args else kwargs["hidden_states"]

    saved = [layer.__dict__.get("forward") for layer in layers]  # e.g. accelerate's hooked forward
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        for layer in layers:
            layer.forward = passthrough
        with non_layer_weights_on(model, layers, device):
            for start in range(0, ids.shape[0], batch_size):
                batch_kwargs.clear()
                try:
                    model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
                except _StopForward:
                    pass
                if len(batch_kwargs) != len(layers):
                    raise RuntimeError(f"the model called {len(batch_kwargs)} of its {len(layers)} decoder layers")
                batch_groups = _groups(batch_kwargs)
                if groups is None:
                    groups = batch_groups
                    for g in groups:  # layers with equal kwargs share one list
                        table.append([] if g == len(table) else table[g])
                elif batch_groups != groups:
                    raise RuntimeError(
                        f"decoder layers received differently grouped arguments in different batches: {groups} vs {batch_groups}"
                    )
                for i, g in enumerate(groups):
                    if g == i:
                        table[i].append(_map_tensors(batch_kwargs[i], _to(offload)))
    finally:
        batch_kwargs.clear()
        for handle in handles:
            handle.remove()
        for layer, forward in zip(layers, saved):
            layer.__dict__.pop("forward", None)
            if forward is not None:
                layer.forward = forward
    return LayerInputs(hidden_states, table)


def _clock(device: torch.device) -> float:
    """perf_counter after the device's queued work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class AttentionCache:
    """One layer's attention outputs, per calibration batch, recorded in one pass and replayed in later
    passes over the same inputs.

    Pruning a layer's MLP does not change what its attention computes, so the passes after the first
    (statistics of refit weights, propagation to the next layer) return the recorded outputs instead of
    recomputing them; the rest of the layer then computes exactly what it would have (same dtype).
    Costs one hidden-state buffer (n x seq_len x hidden, compute dtype, on the host)."""

    def __init__(self) -> None:
        self.outputs: list[Any] = batch_buffer()
        self.passes = 0
        self.seconds = 0.0  # time spent in the attention while recording

    @contextmanager
    def use(self, attention: nn.Module, device: torch.device) -> Iterator[None]:
        """The first pass records ``attention``'s outputs; every later pass replays them (on ``device``),
        so the i-th call of ``attention`` returns the i-th recorded output without computing it."""
        if self.passes == 0:
            started: list[float] = []

            def start(_m: nn.Module, _args: tuple) -> None:
                started.append(_clock(device))

            def finish(_m: nn.Module, _args: tuple, out: Any) -> None:
                self.seconds += _clock(device) - started.pop()
                self.outputs.append(_map_tensors(out, _to(torch.device("cpu"))))

            handles = [attention.register_forward_pre_hook(start), attention.register_forward_hook(finish)]
            try:
                yield
            finally:
                for handle in handles:
                    handle.remove()
        else:
            recorded = iter(self.outputs)
            saved = attention.__dict__.get("forward")  # e.g. accelerate's hooked forward
            attention.forward = lambda *_args, **_kwargs: _map_tensors(next(recorded), _to(device))
            try:
                yield
            finally:
                del attention.forward
                if saved is not None:
                    attention.forward = saved
        self.passes += 1


def compute_copy(layer: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A copy of ``layer`` on ``device`` in ``dtype`` (the original keeps its precision)."""
    if next(layer.parameters()).device == device and next(layer.parameters()).dtype == dtype:
        return layer
    work = copy.deepcopy(layer)
    return work.to(device=device, dtype=dtype)


@torch.no_grad()
def forward_batch(
    layer: nn.Module, hidden: Tensor, kwargs: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``layer``'s output hidden state (B, S, d) for one batch of inputs and the kwargs it received."""
    out = layer(hidden.to(device, dtype), **_map_tensors(kwargs, _to(device, dtype)))
    return out[0] if isinstance(out, (tuple, list)) else out


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
    outputs: list[Tensor] = batch_buffer()
    for index, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs)):
        out = forward_batch(layer, hidden, kwargs, device, dtype)
        if on_output is not None:
            on_output(index, out)
        if keep_outputs:
            outputs.append(out.to("cpu", dtype))
    return inputs.next_layer(outputs)
