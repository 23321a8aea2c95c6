import pytest
import torch

from spap.adapters import get_adapter
from spap.runtime.layerwise import capture_layer_inputs, run_layer

from ..conftest import tiny_ids, tiny_model


def _chain_matches_the_model(model: torch.nn.Module) -> None:
    ids = tiny_ids(n=5, seq_len=16)
    layers = get_adapter(model).decoder_layers(model)
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states
    inputs = capture_layer_inputs(model, layers, ids, 2, torch.device("cpu"), torch.float32)
    assert [h.shape[0] for h in inputs.hidden] == [2, 2, 1]
    for index, layer in enumerate(layers[:-1]):
        inputs = run_layer(layer, inputs, torch.device("cpu"), torch.float32)
        assert inputs.layer_index == index + 1
        torch.testing.assert_close(torch.cat(inputs.hidden), expected[index + 1], rtol=1e-5, atol=1e-5)


def test_layer_by_layer_reproduces_the_models_hidden_states(family):
    _chain_matches_the_model(tiny_model(family))


def test_sliding_window_layers_get_their_own_mask():
    model = tiny_model("qwen2_sliding")
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    _chain_matches_the_model(model)
    inputs = capture_layer_inputs(
        model, model.model.layers, tiny_ids(n=2, seq_len=16), 2, torch.device("cpu"), torch.float32
    )
    table = inputs.kwargs_by_layer
    assert table[1] is table[2] and table[0] is not table[1]  # one record per kind of layer


def test_capture_leaves_the_layers_intact():
    model = tiny_model("llama")
    ids = tiny_ids(n=2, seq_len=16)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    capture_layer_inputs(model, model.model.layers, ids, 2, torch.device("cpu"), torch.float32)
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def test_a_layer_the_model_skips_is_reported():
    model = tiny_model("llama")
    layers = torch.nn.ModuleList([*model.model.layers, model.model.layers[0].__class__(model.config, 3)])
    with pytest.raises(RuntimeError, match="called 3 of its 4 decoder layers"):
        capture_layer_inputs(model, layers, tiny_ids(n=2, seq_len=16), 2, torch.device("cpu"), torch.float32)
