"""Loading checkpoints whose module shapes the stock config cannot express (non-uniform widths,
added biases, per-layer head counts).

config.json carries
  spap_linear_shapes:      {"model.layers.3.mlp.up_proj": [out_features, in_features, has_bias], ...}
  spap_module_attributes:  {"model.layers.3.self_attn": {"num_key_value_groups": 2}, ...}
and a model class derived from the stock one replaces those Linears (and sets those attributes)
right after construction, before weights are loaded.  This file imports only torch and
transformers: spap copies it into such checkpoints as ``modeling_spap.py`` so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without spap installed.
"""

from typing import Any

from torch import nn


def apply_spap_shapes(model: nn.Module, config) -> None:
    """Resize the Linears and set the attributes listed in ``config`` (no-op when absent)."""
    for name, (out_features, in_features, has_bias) in (getattr(config, "spap_linear_shapes", None) or {}).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        new = nn.Linear(
            int(in_features), int(out_features), bias=bool(has_bias), device=old.weight.device, dtype=old.weight.dtype
        )
        setattr(parent, attr, new)
    for name, attributes in (getattr(config, "spap_module_attributes", None) or {}).items():
        module = model.get_submodule(name)
        for key, value in attributes.items():
            setattr(module, key, value)


def spap_model_class(base: Any) -> Any:
    """Subclass of a transformers causal-LM class that applies ``apply_spap_shapes`` on construction."""

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        apply_spap_shapes(self, config)

    return type(f"Spap{base.__name__}", (base,), {"__init__": __init__, "__module__": base.__module__})
