import math

import pytest
import torch
import torch.nn.functional as F

from spap.evaluation.perplexity import final_hidden_states, perplexity, sliced_nll
from spap.io.calibration import bundled_text, tokenize

from ..conftest import tiny_ids, tiny_model, tiny_tokenizer


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


def test_sliced_head_gives_the_nll_of_the_full_logits_for_every_family(family):
    """The output head runs on slices of positions (bounded memory for large vocabularies); each
    family's NLL equals the one from the model's own logits, softcapping (Gemma 2/3) included."""
    model, ids = tiny_model(family), tiny_ids(n=3, seq_len=16)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        expected = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        hidden = final_hidden_states(model, ids)[:, :-1]
        rows = hidden.reshape(-1, hidden.shape[-1])
        one_row_slices = sliced_nll(model, rows, ids[:, 1:].reshape(-1), max_logits_bytes=1)
        all_at_once = sliced_nll(model, rows, ids[:, 1:].reshape(-1), max_logits_bytes=2**40)
    assert one_row_slices == pytest.approx(expected, rel=1e-6)
    assert all_at_once == pytest.approx(expected, rel=1e-6)
