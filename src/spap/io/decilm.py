"""Export a pruned LLaMA-family checkpoint as DeciLM / Nemotron-NAS (``DeciLMForCausalLM``): the one
format that serving engines (vLLM, SGLang, TensorRT-LLM, llama.cpp's ``deci`` architecture) run with
a different MLP width and KV-head count in every layer.

The weights are copied as they are (DeciLM names its tensors as LLaMA does); config.json gets
``block_configs`` (see ``decilm_code``) and an ``auto_map`` to ``modeling_spap_decilm.py``, a copy of
``decilm_code``, so that transformers loads it with ``trust_remote_code=True``.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import UsageError
from . import decilm_code
from .atomic import atomic_directory
from .checkpoint import REPORT_FILE
from .shards import INDEX_FILE, SafetensorsCheckpoint

CODE_FILE = "modeling_spap_decilm.py"
FAMILIES = ("llama", "mistral", "qwen2")
_DROPPED: tuple[str, ...] = ("spap_linear_shapes", "spap_module_attributes", "auto_map", "architectures", "model_type")
_DROPPED += ("layer_types", "sliding_window", "use_sliding_window", "max_window_layers")  # DeciLM: full attention
_COMPANIONS: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_COMPANIONS += ("tokenizer.model", "chat_template.jinja", "generation_config.json", REPORT_FILE)


def decilm_config(checkpoint: str | Path) -> dict[str, Any]:
    """config.json of ``checkpoint``'s DeciLM export, from its config and the tensor shapes in its
    safetensors headers; ``UsageError`` naming the layer for shapes DeciLM cannot hold."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise UsageError(f"{checkpoint} is not a checkpoint directory (no config.json)")
    config = json.loads((checkpoint / "config.json").read_text())
    family = config.get("model_type")
    if family not in FAMILIES:
        raise UsageError(f"DeciLM export takes LLaMA-family checkpoints ({', '.join(FAMILIES)}), not {family!r}")
    shapes = SafetensorsCheckpoint(checkpoint).shapes()
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    blocks, widths, kv_counts = [], [], []
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        width = shapes[f"{prefix}.mlp.down_proj.weight"][1]
        queries = shapes[f"{prefix}.self_attn.q_proj.weight"][0] // head_dim
        kv = shapes[f"{prefix}.self_attn.k_proj.weight"][0] // head_dim
        if queries != heads:
            raise UsageError(
                f"layer {i} keeps {queries} of {heads} query heads; DeciLM keeps every layer's query heads "
                "(prune whole KV groups: --head-unit kv-group)"
            )
        if width % 256:
            raise UsageError(
                f"layer {i} keeps {width} MLP neurons; DeciLM stores MLP widths in multiples of 256: "
                "prune with --width-multiple 256"
            )
        attention = {"n_heads_in_group": heads // kv, "no_op": False, "replace_with_linear": False, "sparsify": None}
        ffn = {"ffn_mult": decilm_code.ffn_mult_of(width, hidden), "no_op": False, "replace_with_linear": False}
        blocks.append({"attention": attention, "ffn": {**ffn, "sparsify": None}})
        widths.append(width)
        kv_counts.append(kv)
    exported = {key: value for key, value in config.items() if key not in _DROPPED}
    exported.update(
        architectures=["DeciLMForCausalLM"],
        model_type=decilm_code.DeciLMConfig.model_type,
        block_configs=blocks,
        intermediate_size=max(widths),
        num_key_value_heads=max(kv_counts),
        auto_map={
            "AutoConfig": f"{CODE_FILE[:-3]}.DeciLMConfig",
            "AutoModelForCausalLM": f"{CODE_FILE[:-3]}.DeciLMForCausalLM",
        },
    )
    if family == "qwen2":  # biases on q, k, v only (vLLM's DeciLM reads qkv_bias; o_proj has none)
        exported.update(attention_bias=False, qkv_bias=True)
    return exported


def export_decilm(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``checkpoint`` (a spap output, any per-layer MLP widths and KV groups) as a DeciLM
    checkpoint in ``out``, atomically."""
    checkpoint, out = Path(checkpoint), Path(out)
    config = decilm_config(checkpoint)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty directory; pass --overwrite to replace it")
    with atomic_directory(out, overwrite) as tmp:
        for file in [
            *checkpoint.glob("*.safetensors"),
            checkpoint / INDEX_FILE,
            *(checkpoint / f for f in _COMPANIONS),
        ]:
            if file.is_file():
                shutil.copy2(file, tmp / file.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CODE_FILE).write_text(inspect.getsource(decilm_code))
    return out


def register() -> None:
    """Let transformers' Auto classes (and so every spap command) open DeciLM checkpoints with
    ``decilm_code``'s classes; idempotent."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(decilm_code.DeciLMConfig.model_type, decilm_code.DeciLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(decilm_code.DeciLMConfig, decilm_code.DeciLMForCausalLM, exist_ok=True)
