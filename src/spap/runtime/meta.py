"""The model as a weightless skeleton, one decoder layer materialised at a time.

The skeleton is built on the meta device (accelerate's ``init_empty_weights``; buffers such as
rotary frequencies stay real). ``StreamedLayers`` materialises the input embeddings while the
calibration inputs are captured and one decoder layer while it is worked on, read from the
checkpoint's safetensors shards; a finished layer is written to the output shards (``ShardWriter``,
the save dtype) if there are any, and returned to the meta device. Layers are materialised in the
in-memory path's working dtype (float32), and the embeddings' output is cast to it, so a streamed
computation equals the in-memory one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters import get_adapter
from ..io.shards import CheckpointError, SafetensorsCheckpoint, ShardWriter, verify_tensors

WORK_DTYPE = torch.float32
"""dtype layers are materialised in: the in-memory path loads models in float32 (``load_model``)."""


def empty_model(path: str | Path) -> nn.Module:
    """The model of checkpoint ``path`` with every parameter on the meta device (no weight memory);
    checkpoints spap wrote with non-stock shapes get those shapes."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from ..io import remote_code
    from ..io.decilm import register

    register()
    config = AutoConfig.from_pretrained(str(path))
    shaped = getattr(config, "spap_linear_shapes", None) or getattr(config, "spap_module_attributes", None)
    default = torch.get_default_dtype()
    torch.set_default_dtype(WORK_DTYPE)  # buffers made at construction (embed_scale) as load_model has them
    try:
        with init_empty_weights(include_buffers=False):
            if shaped:
                model = remote_code.spap_model_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])(config)
            else:
                model = AutoModelForCausalLM.from_config(config, dtype=WORK_DTYPE)
    finally:
        torch.set_default_dtype(default)
    model.tie_weights()
    model.eval()
    return model


def open_streamed(path: str | Path) -> tuple[Any, SafetensorsCheckpoint]:
    """(weightless skeleton, shard reader) of checkpoint ``path``, its stored tensors checked against
    the skeleton that config.json describes before any work (``verify_tensors``)."""
    source = SafetensorsCheckpoint(path)
    model = empty_model(path)
    verify_tensors(source, model)
    return model, source


def materialised_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model`` that hold memory (not on the meta device)."""
    return sum(p.numel() for p in model.parameters() if p.device.type != "meta")


def set_tensor(module: nn.Module, name: str, value: Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def to_meta(module: nn.Module) -> None:
    """Free ``module``'s parameters and persistent buffers (shapes are kept, storage released)."""
    for sub in module.modules():
        for attr, p in list(sub._parameters.items()):
            if p is not None and p.device.type != "meta":
                sub._parameters[attr] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for attr, b in list(sub._buffers.items()):
            if b is not None and attr not in sub._non_persistent_buffers_set and b.device.type != "meta":
                sub._buffers[attr] = torch.empty_like(b, device="meta")


def unique_state_names(module: nn.Module) -> list[str]:
    """State-dict names of ``module`` with tied tensors listed once (first name), as save_pretrained does."""
    seen: set[int] = set()
    names = []
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            names.append(name)
    return names


class StreamedLayers:
    """Materialise decoder layers from ``source`` on demand and write finished ones to ``writer``.

    The pipeline calls ``load(i)`` before it touches layer i and ``release(i, write)`` after; only the
    embeddings (during ``capture``) and one decoder layer at a time hold memory. ``writer`` None: pruned
    layers are freed without being written (data-parallel ranks other than 0, probe passes).
    """

    def __init__(self, model: nn.Module, source: SafetensorsCheckpoint, writer: ShardWriter | None = None) -> None:
        self.model: Any = model  # a transformers PreTrainedModel
        self.source, self.writer = source, writer
        self.adapter = get_adapter(model)
        self.prefix = self.adapter.layers_prefix(model)
        self.layers = self.adapter.decoder_layers(model)
        self.max_resident_layers = 0  # most decoder layers holding memory at once (checked by tests)

    def _layer_name(self, index: int) -> str:
        return f"{self.prefix}.{index}."

    def _resident_layers(self) -> int:
        return sum(materialised_parameters(layer) > 0 for layer in self.layers)

    def load(self, index: int) -> None:
        """Read layer ``index``'s tensors into the skeleton (float32)."""
        layer = self.layers[index]
        names = [n for n in unique_state_names(layer) if _tensor_of(layer, n).device.type == "meta"]
        prefix = self._layer_name(index)
        for name, tensor in self.source.read(prefix + n for n in names).items():
            set_tensor(layer, name[len(prefix) :], tensor.to(WORK_DTYPE) if tensor.is_floating_point() else tensor)
        self.max_resident_layers = max(self.max_resident_layers, self._resident_layers())

    def release(self, index: int, write: bool) -> None:
        """Write layer ``index`` (if ``write`` and there is a writer), then free it."""
        layer = self.layers[index]
        if write and self.writer is not None:
            prefix = self._layer_name(index)
            self.writer.add({prefix + n: t for n, t in layer.state_dict().items()})
        to_meta(layer)

    def _outside_layers(self) -> list[str]:
        """Unique state names outside the decoder layers (tied head listed once, as the embeddings)."""
        return [n for n in unique_state_names(self.model) if not n.startswith(self.prefix + ".")]

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Everything outside the decoder layers but the output head materialised (float32) for the
        capture pass. A plain ``nn.Embedding`` table stays in its stored dtype and its output is cast to
        float32 (the same values, half the memory for bf16 checkpoints)."""
        embeddings = self.model.get_input_embeddings()
        head = self.model.get_output_embeddings()
        skip = set() if head is None or head.weight is embeddings.weight else {module_name(self.model, head)}
        plain = type(embeddings) is nn.Embedding
        table = f"{module_name(self.model, embeddings)}.weight"
        names = [n for n in self._outside_layers() if n.rpartition(".")[0] not in skip]
        for name, tensor in self.source.read(names).items():
            keep = plain and name == table
            set_tensor(self.model, name, tensor if keep or not tensor.is_floating_point() else tensor.to(WORK_DTYPE))
        handle = embeddings.register_forward_hook(lambda _m, _a, out: out.to(WORK_DTYPE)) if plain else None
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()
            for name in names:
                owner_name, _, _attr = name.rpartition(".")
                to_meta(self.model.get_submodule(owner_name) if owner_name else self.model)
            self.model.tie_weights()

    def write_rest(self) -> None:
        """Copy every tensor outside the decoder layers from the source to the writer, one at a time."""
        assert self.writer is not None
        available = self.source.names()
        for name in self._outside_layers():
            if name not in available:
                raise CheckpointError(f"{self.source.directory}: the checkpoint has no tensor {name!r}")
            self.writer.add(self.source.read([name]), owned=True)


def _tensor_of(module: nn.Module, name: str) -> Tensor:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    value: Any = owner._parameters.get(attr)
    tensor: Any = value if value is not None else owner._buffers[attr]
    return tensor


def module_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise KeyError("module not found")
