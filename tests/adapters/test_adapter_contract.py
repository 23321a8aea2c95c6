"""The adapter contract: what the pipeline assumes of every model family's adapter, one test class
that each family subclasses (a new family adds a subclass and a tiny config in conftest)."""

from __future__ import annotations

import torch

from spap.adapters import get_adapter

from ..conftest import tiny_ids, tiny_model


class AdapterContract:
    family: str
    layer = 1  # a middle layer of the three

    def setup_method(self) -> None:
        self.model = tiny_model(self.family)
        self.adapter = get_adapter(self.model)
        self.block = self.adapter.decoder_layers(self.model)[self.layer]

    def _mlp_input_and_output(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's MLP input (the input linear's) and output (the down projection's) in a forward."""
        seen = {}
        linears = self.adapter.mlp_linears(self.block)
        hooks = [
            self.adapter.mlp_input_linear(self.block).register_forward_pre_hook(
                lambda _m, args: seen.__setitem__("x", args[0])
            ),
            linears["down"].register_forward_hook(lambda _m, _a, out: seen.__setitem__("y", out)),
        ]
        with torch.no_grad():
            self.model(tiny_ids(2, 12))
        for hook in hooks:
            hook.remove()
        return seen["x"], seen["y"]

    def test_the_functional_mlp_computes_the_layer_s_mlp(self):
        x, y = self._mlp_input_and_output()
        mlp = self.adapter.read_mlp(self.block)
        assert mlp.width == self.adapter.mlp_width(self.block)
        torch.testing.assert_close(mlp(x), y, rtol=1e-5, atol=1e-5)

    def test_a_written_mlp_is_the_one_the_layer_runs(self):
        width = self.adapter.mlp_width(self.block)
        keep = torch.arange(0, width, 2)
        smaller = self.adapter.read_mlp(self.block).select(keep)
        self.adapter.write_mlp(self.block, smaller)
        assert self.adapter.mlp_width(self.block) == len(keep)
        x, y = self._mlp_input_and_output()
        torch.testing.assert_close(smaller(x), y, rtol=1e-5, atol=1e-5)

    def test_the_layers_prefix_names_the_decoder_layers_in_the_state_dict(self):
        prefix = self.adapter.layers_prefix(self.model)
        names = self.model.state_dict()
        assert any(name.startswith(f"{prefix}.{self.layer}.") for name in names)

    def test_the_attention_shape_is_the_config_s(self):
        config = self.model.config
        heads, kv_heads, head_dim = self.adapter.attention_shape(self.block)
        assert heads == config.num_attention_heads
        assert kv_heads == (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        assert heads * head_dim == self.adapter.attention_output_linear(self.block).in_features

    def test_removing_a_layer_keeps_modules_and_config_in_step(self):
        self.adapter.remove_layers(self.model, [0])
        layers = self.adapter.decoder_layers(self.model)
        assert len(layers) == self.model.config.num_hidden_layers == 2
        types = getattr(self.model.config, "layer_types", None)
        assert types is None or len(types) == 2
        with torch.no_grad():
            assert torch.isfinite(self.model(tiny_ids(1, 8)).logits).all()


class TestLlama(AdapterContract):
    family = "llama"


class TestQwen2(AdapterContract):
    family = "qwen2_sliding"


class TestMistral(AdapterContract):
    family = "mistral"


class TestGemma(AdapterContract):
    family = "gemma"


class TestGemma2(AdapterContract):
    family = "gemma2"


class TestGemma3(AdapterContract):
    family = "gemma3_text"


class TestOPT(AdapterContract):
    family = "opt"
