"""Saving pruned models as ordinary Hugging Face checkpoints (plus pruning.json) and loading them."""

from __future__ import annotations

import copy
import inspect
import json
import logging
import time
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..adapters import get_adapter
from . import remote_code
from .atomic import atomic_directory
from .calibration import CALIBRATION_FILE, weights_as
from .shards import (
    CheckpointError,
    SafetensorsCheckpoint,
    all_finite,
    check_tensor_names,
    non_finite_message,
    verify_tensors,
)

log = logging.getLogger(__name__)

REPORT_FILE = "pruning.json"
REMOTE_CODE_FILE = "modeling_spap.py"


def _linear_layout(model: nn.Module) -> dict[str, tuple[int, int, bool]]:
    return {
        name: (m.out_features, m.in_features, m.bias is not None)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }


def stock_reference(config: Any, model_class: type) -> nn.Module:
    """The module tree a stock ``model_class`` builds from ``config`` (on the meta device, no memory)."""
    with torch.device("meta"):
        return model_class(copy.deepcopy(config))


def _differing_attributes(model: nn.Module, reference: nn.Module) -> dict[str, dict[str, Any]]:
    """Head-count attributes (``adapter.head_attributes``) of ``model``'s attention modules that differ
    from those the stock ``reference`` builds, by module name: what query-head pruning changed."""
    adapter = get_adapter(model)
    names = list(adapter.head_attributes(1, 1))
    paths = {id(module): name for name, module in model.named_modules()}
    out = {}
    for layer in adapter.decoder_layers(model):
        attention = adapter.attention_module(layer)
        name = paths[id(attention)]
        stock = reference.get_submodule(name)
        changed = {k: getattr(attention, k) for k in names if getattr(attention, k, None) != getattr(stock, k, None)}
        if changed:
            out[name] = changed
    return out


def export_config(model: nn.Module) -> Any:
    """A config for ``model``'s current shapes: uniform MLP width written to the stock field, and
    ``spap_linear_shapes`` for anything the stock class would build differently."""
    adapter = get_adapter(model)
    config: Any = copy.deepcopy(model.config)
    widths = [adapter.mlp_width(layer) for layer in adapter.decoder_layers(model)]
    setattr(config, adapter.width_attribute, max(widths))
    _set_uniform_heads(adapter, model, config)
    for attr in ("spap_linear_shapes", "spap_module_attributes", "auto_map"):
        if hasattr(config, attr):
            delattr(config, attr)
    actual = _linear_layout(model)
    reference = stock_reference(config, _stock_class(model))
    expected = _linear_layout(reference)
    differing = {name: list(shape) for name, shape in actual.items() if expected.get(name) != shape}
    missing = set(expected) - set(actual)
    if missing:
        raise ValueError(f"model lacks Linear modules its config describes: {sorted(missing)[:3]}")
    attributes = _differing_attributes(model, reference)
    if differing or attributes:
        config.spap_linear_shapes = differing
        config.spap_module_attributes = attributes
        config.auto_map = {"AutoModelForCausalLM": f"{REMOTE_CODE_FILE[:-3]}.SpapForCausalLM"}
    return config


def _set_uniform_heads(adapter, model: nn.Module, config: Any) -> None:
    """Write uniform head counts to the config when the stock config class accepts them."""
    try:
        shapes = {adapter.attention_shape(layer) for layer in adapter.decoder_layers(model)}
    except NotImplementedError:
        return
    if len(shapes) != 1:
        return
    updates = adapter.head_config(*shapes.pop())
    if not updates or all(getattr(config, k, None) == v for k, v in updates.items()):
        return
    try:  # e.g. LlamaConfig requires hidden_size % num_attention_heads == 0
        type(config)(**{**config.to_dict(), **updates})
    except Exception:  # noqa: BLE001 - transformers raises various validation errors
        log.info("head counts %s are not a valid %s; the checkpoint uses spap's loader", updates, type(config).__name__)
        return
    for key, value in updates.items():
        setattr(config, key, value)


def _stock_class(model: nn.Module) -> type:
    cls = type(model)
    while cls.__name__.startswith("Spap"):
        cls = cls.__mro__[1]
    return cls


def pad_mlps_to_uniform(model: nn.Module) -> int:
    """Zero-pad every MLP to the widest one (in place); the function computed is unchanged because a
    padded neuron has zero input rows (act(0) * 0 = 0 for GLU, act(0 + 0) = 0 for ReLU) and a zero
    output column.  Returns the common width."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    width = max(adapter.mlp_width(layer) for layer in layers)
    for layer in layers:
        if adapter.mlp_width(layer) < width:
            adapter.write_mlp(layer, adapter.read_mlp(layer).padded(width))
    return width


def save_pruned(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer: Any = None,
    report: dict[str, Any] | None = None,
    overwrite: bool = False,
    pad_to_uniform: bool = False,
    calibration_ids: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` (+ tokenizer, + ``pruning.json``) to ``out_dir`` atomically.

    ``dtype``: floating-point parameters are written in this dtype (None: as they are in memory),
    from a swapped-in copy (``calibration.weights_as``): the model in memory is left unchanged.

    ``calibration_ids`` (n, seq_len), if given, are saved as calibration_ids.pt (reusable with
    ``--calib DIR/calibration_ids.pt``; worth it for self-generated calibration, which is slow).

    ``pad_to_uniform`` zero-pads non-uniform MLP widths (modifies ``model``) so that stock loaders
    (transformers without trust_remote_code, vLLM) read the checkpoint, at the cost of the padding.
    """
    out_dir = Path(out_dir)
    if pad_to_uniform:
        pad_mlps_to_uniform(model)
    config = export_config(model)
    needs_code = hasattr(config, "auto_map")
    started = time.perf_counter()
    with atomic_directory(out_dir, overwrite=overwrite) as tmp, weights_as(model, None, dtype):
        original = model.config
        if dtype is not None:
            config.dtype = str(dtype).removeprefix("torch.")
        model.config = config
        try:
            cast(Any, model).save_pretrained(tmp, safe_serialization=True)
        finally:
            model.config = original
        write_companions(tmp, model, needs_code, tokenizer, report, started, calibration_ids)
    if needs_code:
        log.info(
            "%s: layer shapes differ from the stock config; load with spap.load_pretrained(dir) or "
            "AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)",
            out_dir,
        )
    return out_dir


def write_companions(
    directory: Path,
    model: nn.Module,
    needs_code: bool,
    tokenizer: Any,
    report: dict[str, Any] | None,
    started: float,
    calibration_ids: torch.Tensor | None,
) -> None:
    """Everything of a spap checkpoint beside weights and config: the shape-aware loader (when the
    shapes are not stock), tokenizer, pruning.json (with the save time since ``started``) and the
    calibration ids."""
    if needs_code:
        base = _stock_class(model).__name__
        source = inspect.getsource(remote_code)
        source += (
            f"\n\nfrom transformers import {base} as _Base  # noqa: E402\n\nSpapForCausalLM = spap_model_class(_Base)\n"
        )
        (directory / REMOTE_CODE_FILE).write_text(source)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if report is not None:
        report = {**report, "seconds": {**report.get("seconds", {}), "save": time.perf_counter() - started}}
        (directory / REPORT_FILE).write_text(json.dumps(report, indent=2))
    if calibration_ids is not None:
        torch.save(calibration_ids.cpu(), directory / CALIBRATION_FILE)


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """Load any checkpoint spap wrote (uniform or not) without executing code from ``path``.

    Refused (``CheckpointError``) before the weights load: stored tensors missing, unexpected or of
    another shape than config.json describes; after: a weight holding NaN or inf."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from .decilm import register

    register()
    _verify_local_safetensors(path)
    config = AutoConfig.from_pretrained(path)
    model: Any
    if getattr(config, "spap_linear_shapes", None) or getattr(config, "spap_module_attributes", None):
        cls = remote_code.spap_model_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])
        model, info = cls.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True)
    else:
        model, info = cast(Any, AutoModelForCausalLM).from_pretrained(path, dtype=dtype, output_loading_info=True)
    # other formats than safetensors (checked above): transformers would initialise missing ones at random
    check_tensor_names(path, sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ())), [])
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not all_finite(tensor):
            raise CheckpointError(non_finite_message(path, name))
    return model.to(device)


def _verify_local_safetensors(path: str | Path) -> None:
    """``verify_tensors`` for a local safetensors checkpoint (hub ids and other formats: skipped)."""
    from ..runtime.meta import empty_model

    if not (Path(path) / "config.json").is_file() or not any(Path(path).glob("*.safetensors")):
        return
    verify_tensors(SafetensorsCheckpoint(path), empty_model(path))


def read_report(path: str | Path) -> dict[str, Any]:
    file = Path(path) / REPORT_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found (not a spap output directory?)")
    return json.loads(file.read_text())
