"""DeciLM / Nemotron-NAS checkpoints (``DeciLMForCausalLM``): a LLaMA whose decoder layers each have
their own MLP width and KV-head count, described by ``block_configs`` in config.json:

    {"attention": {"n_heads_in_group": q_heads // kv_heads, "no_op": false, "replace_with_linear": false},
     "ffn": {"ffn_mult": 3 * width / (2 * hidden), "no_op": false, "replace_with_linear": false}}

with width = roundup(int(2 * ffn_mult * hidden / 3), 256), as NVIDIA's releases, vLLM and llama.cpp's
``deci`` converter read it. This file imports only torch and transformers: spap copies it into
DeciLM exports as ``modeling_spap_decilm.py``, so ``from_pretrained(dir, trust_remote_code=True)``
loads them without spap, and ``spap.load_pretrained`` uses it without running code from the
directory. Attention-free, linear-replaced and no-op blocks are not written by spap and refused.
"""

from typing import Any

from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


def ffn_width(ffn_mult: float, hidden_size: int) -> int:
    """DeciLM's MLP width of ``ffn_mult``: roundup(int(2 * ffn_mult * hidden / 3), 256)."""
    width = int(2 * ffn_mult * hidden_size / 3)
    return width if width % 256 == 0 else width + 256 - width % 256


def ffn_mult_of(width: int, hidden_size: int) -> float:
    """The ``ffn_mult`` whose DeciLM width is ``width`` (a multiple of 256)."""
    mult = 3 * width / (2 * hidden_size)
    if ffn_width(mult, hidden_size) != width:
        raise ValueError(f"no ffn_mult gives MLP width {width} at hidden size {hidden_size}")
    return mult


class Fields(dict):
    """A dict whose keys read as attributes too (``block_configs[i].attention.no_op``, as vLLM reads
    them); it is still a dict for json."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(
        self, block_configs: list[dict[str, Any]] | None = None, qkv_bias: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.qkv_bias = qkv_bias  # Qwen2-style biases on q, k and v only
        self.block_configs = [
            Fields({key: Fields(value) if isinstance(value, dict) else value for key, value in block.items()})
            for block in block_configs or []
        ]

    def layer_shapes(self) -> list[tuple[int, int]]:
        """(MLP width, KV heads) of every decoder layer."""
        shapes = []
        for index, block in enumerate(self.block_configs):
            attention, ffn = block["attention"], block["ffn"]
            special = [k for k in ("no_op", "replace_with_linear") if attention.get(k) or ffn.get(k)]
            if special or attention.get("n_heads_in_group") is None or ffn.get("ffn_mult") is None:
                raise ValueError(f"block {index}: {special or 'a missing size'}: only plain blocks are supported")
            heads = self.num_attention_heads // attention["n_heads_in_group"]
            shapes.append((ffn_width(ffn["ffn_mult"], self.hidden_size), heads))
        return shapes


class DeciLMForCausalLM(LlamaForCausalLM):
    """LLaMA built at the widest shapes, each layer's MLP and k/v projections then resized to its
    block's, before weights load."""

    config_class = DeciLMConfig

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        for layer, (width, kv_heads) in zip(self.model.layers, config.layer_shapes(), strict=True):
            mlp, attention = layer.mlp, layer.self_attn
            for name in ("gate_proj", "up_proj"):
                setattr(mlp, name, _linear(getattr(mlp, name), width, config.hidden_size))
            mlp.down_proj = _linear(mlp.down_proj, config.hidden_size, width)
            for name in ("q_proj", "k_proj", "v_proj"):
                out = config.num_attention_heads * head_dim if name == "q_proj" else kv_heads * head_dim
                bias = config.qkv_bias or getattr(attention, name).bias is not None
                setattr(attention, name, _linear(getattr(attention, name), out, config.hidden_size, bias))
            attention.num_key_value_groups = config.num_attention_heads // kv_heads


def _linear(old: nn.Linear, out_features: int, in_features: int, bias: bool | None = None) -> nn.Linear:
    bias = old.bias is not None if bias is None else bias
    if (old.out_features, old.in_features, old.bias is not None) == (out_features, in_features, bias):
        return old
    return nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)
