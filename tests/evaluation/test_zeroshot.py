import json

import pytest
import torch

from spap.evaluation.zeroshot import Example, continuation_logprobs, encode_pair, evaluate_task, load_task

from ..conftest import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", seed=3), tiny_tokenizer()


def brute_force_logprob(model, ids: list[int], n: int) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return sum(float(logp[i - 1, ids[i]]) for i in range(len(ids) - n, len(ids)))


def test_batched_scores_equal_brute_force(lm):
    model, tok = lm
    reqs = [encode_pair(tok, "The cat sat on the", c, None) for c in [" mat", " dog that barked", "."]]
    got = continuation_logprobs(model, reqs, batch_size=2, progress=False)
    for (ids, n), value in zip(reqs, got):
        assert value == pytest.approx(brute_force_logprob(model, ids, n), abs=1e-4)


def test_scorer_picks_highest_summed_logprob_and_normalises_by_length(lm):
    model, tok = lm
    context = "Once upon a time"
    choices = ["x", "and then the little cat went on walking along the old river road"]
    reqs = [encode_pair(tok, context, " " + c, None) for c in choices]
    scores = continuation_logprobs(model, reqs, progress=False)
    best = max(range(2), key=scores.__getitem__)
    best_norm = max(range(2), key=lambda i: scores[i] / len(choices[i]))
    assert best != best_norm  # the constructed case separates the two metrics
    for label in range(2):
        r = evaluate_task(model, tok, [Example(context, choices, label)], progress=False)
        assert r.acc == float(label == best)
        assert r.acc_norm == float(label == best_norm)


def test_bos_is_prepended_when_tokenizer_adds_one(lm):
    _, tok = lm
    ids, n = encode_pair(tok, "Hello", " world", bos=tok.bos_token_id)
    assert ids[0] == tok.bos_token_id and n >= 1
    plain, _ = encode_pair(tok, "Hello", " world", bos=None)
    assert ids[1:] == plain


def test_task_files_load(tmp_path):
    bb = tmp_path / "t.json"
    bb.write_text(json.dumps({"name": "demo", "examples": [{"input": "2+2?", "target_scores": {"3": 0, "4": 1}}]}))
    name, ex = load_task(bb)
    assert name == "demo" and ex[0].choices == ["3", "4"] and ex[0].label == 1
    assert ex[0].context == "Q: 2+2?\nA: "
    jl = tmp_path / "u.jsonl"
    jl.write_text('{"context": "Sky is", "choices": ["blue", "green"], "label": 0}\n')
    assert load_task(jl)[1][0].choices == ["blue", "green"]
    jl.write_text('{"context": "x", "choices": ["a"]}\n')
    with pytest.raises(ValueError, match="label"):
        load_task(jl)
    with pytest.raises(FileNotFoundError):
        load_task(tmp_path / "missing.json")


def test_harness_without_lm_eval_says_what_is_missing(lm, monkeypatch):
    import builtins

    from spap.evaluation.harness import run_harness

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("lm_eval"):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(RuntimeError, match=r"pip install 'spap\[eval\]'"):
        run_harness(*lm, ["arc_easy"])
