import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import spap
from spap.io.atomic import atomic_directory

from ..conftest import tiny_ids, tiny_model
from ..pruning.test_pipeline import fast_config, logits


def test_save_then_stock_from_pretrained_gives_identical_logits(family, tmp_path):
    model, ids = tiny_model(family), tiny_ids()
    report = spap.prune(model, config=fast_config(0.3), calibration_ids=ids)
    out = spap.save_pruned(model, tmp_path / "pruned", report=report.to_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    config = json.loads((out / "config.json").read_text())
    width_key = "ffn_dim" if family == "opt" else "intermediate_size"
    assert config[width_key] == report.widths[0]
    assert "auto_map" not in config  # uniform widths: no custom code needed
    saved = json.loads((out / "pruning.json").read_text())
    assert saved["widths"] == report.widths
    assert saved["config"]["sparsity"] == 0.3
    assert {"torch", "transformers", "spap"} <= set(saved["versions"])


def test_existing_output_is_not_overwritten_without_permission(tmp_path):
    model = tiny_model("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        spap.save_pruned(model, out)
    assert (out / "keep.txt").exists()
    spap.save_pruned(model, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_failed_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "result"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "half.bin").write_text("partial")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_pytorch_bin_checkpoint_missing_a_tensor_is_refused(tmp_path):
    """Formats other than safetensors go through transformers' loading report, which would otherwise
    initialise the missing tensor at random."""
    from spap.io.checkpoint import load_pretrained
    from spap.io.shards import CheckpointError

    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    state = model.state_dict()
    del state["model.layers.0.mlp.down_proj.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"1 missing \(e.g. model.layers.0.mlp.down_proj.weight\)"):
        load_pretrained(tmp_path)
