import math

import pytest
import torch
import torch.nn.functional as F

from spap.calibration import bundled_text, tokenize
from spap.evaluation.perplexity import perplexity

from .conftest import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def lm_and_text():
    return tiny_model("llama", seed=5), tiny_tokenizer(), bundled_text()[:4000]


def window_nll(model, tokenizer, text: str, seq_len: int) -> torch.Tensor:
    """Per-token NLL (windows x seq_len - 1), one window at a time, from first principles."""
    ids = tokenize(tokenizer, text)
    n = ids.numel() // seq_len
    rows = []
    with torch.no_grad():
        for w in ids[: n * seq_len].view(n, seq_len):
            logits = model(w[None]).logits[0]
            rows.append(F.cross_entropy(logits[:-1], w[1:], reduction="none"))
    return torch.stack(rows)


@pytest.mark.parametrize("score_from", [0, 5, 15])
def test_perplexity_is_exp_mean_nll_of_the_scored_positions(lm_and_text, score_from):
    model, tok, text = lm_and_text
    seq_len = 32
    nll = window_nll(model, tok, text, seq_len)
    got = perplexity(
        model, tok, text, seq_len, batch_size=3, dtype=torch.float32, progress=False, score_from=score_from
    )
    assert got.n_windows == nll.shape[0]
    assert got.n_predicted_tokens == nll[:, score_from:].numel()
    assert got.perplexity == pytest.approx(math.exp(float(nll[:, score_from:].mean())), rel=1e-5)


def test_score_from_outside_the_window_is_refused(lm_and_text):
    model, tok, text = lm_and_text
    with pytest.raises(ValueError, match="score_from"):
        perplexity(model, tok, text, 32, progress=False, score_from=31)
