import json

import pytest
import torch

import spap
from spap.adapters import get_adapter
from spap.config import PruneConfig, RuntimeConfig
from spap.core import SolverConfig

from ..conftest import tiny_ids, tiny_model
from .test_pipeline import logits


@pytest.mark.parametrize("method", ["magnitude", "wanda-sp", "fasp", "flap", "cfsp"])
def test_baseline_prunes_requested_count_and_reloads(family, method, tmp_path):
    model, ids = tiny_model(family), tiny_ids()
    adapter = get_adapter(model)
    widths = [adapter.mlp_width(layer) for layer in adapter.decoder_layers(model)]
    report = spap.prune(
        model,
        config=PruneConfig(
            sparsity=0.3, runtime=RuntimeConfig(compute_dtype="float32"), solver=SolverConfig(method=method)
        ),
        calibration_ids=ids,
    )
    removed = [m - w for m, w in zip(widths, report.widths)]
    if method in ("flap", "cfsp"):  # global allocations: exact total, per-layer counts may differ
        assert sum(removed) == round(0.3 * sum(widths))
        assert report.extra["allocation"]["counts"] == removed
    else:
        assert removed == [round(0.3 * m) for m in widths]
    out = spap.save_pruned(model, tmp_path / method, report=report.to_dict())
    assert torch.equal(logits(spap.load_pretrained(out), ids), logits(model, ids))
    if method == "flap" and family != "opt":
        # FLAP's bias compensation adds a down_proj bias the stock LLaMA/Qwen2/Mistral MLP lacks
        config = json.loads((out / "config.json").read_text())
        assert any(v[2] for k, v in config["spap_linear_shapes"].items() if k.endswith("down_proj"))
        from transformers import AutoModelForCausalLM

        remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        assert torch.equal(logits(remote, ids), logits(model, ids))
