"""``spap prune --offload``: the streamed path chosen from the memory budget, the same checkpoint as
in memory, and clean refusals of what it cannot do."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from spap.cli import main

from ..pruning.test_offload import assert_same_checkpoint
from .test_cli_failures import _nothing_left, _one_error_line, _prune


@pytest.fixture()
def calib(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    return text


def test_offload_always_writes_what_offload_never_writes(tiny_checkpoint, tmp_path, calib, capsys):
    streamed, resident = tmp_path / "streamed", tmp_path / "resident"
    assert _prune(tiny_checkpoint, streamed, calib, "--offload", "always", "--refit-rounds", "2") == 0
    assert "out of core" in capsys.readouterr().out
    assert _prune(tiny_checkpoint, resident, calib, "--offload", "never", "--refit-rounds", "2") == 0
    assert_same_checkpoint(streamed, resident)
    report = json.loads((streamed / "pruning.json").read_text())
    assert report["offload"] is True and report["extra"]["max_resident_layers"] == 1
    assert report["command"].startswith("spap prune") and "--offload always" in report["command"]
    assert "offload" not in json.loads((resident / "pruning.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(streamed)
    assert reloaded.config.intermediate_size == 48 - 12


def test_auto_offloads_only_when_the_model_exceeds_the_budget(tiny_checkpoint, tmp_path, calib):
    small, roomy = tmp_path / "small-budget", tmp_path / "roomy"
    # float64 named: a budget this small would otherwise also take float32 solves
    assert _prune(tiny_checkpoint, small, calib, "--max-host-memory", "1e-6", "--solve-dtype", "float64") == 0
    assert _prune(tiny_checkpoint, roomy, calib, "--max-host-memory", "64") == 0
    assert json.loads((small / "pruning.json").read_text()).get("offload") is True
    assert "offload" not in json.loads((roomy / "pruning.json").read_text())
    recorded = json.loads((roomy / "pruning.json").read_text())["config"]["runtime"]["max_host_memory_gib"]
    assert recorded == 64
    assert_same_checkpoint(small, roomy)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--eval", "--ppl-seq-len", "32"], "spap eval"),
        (["--pad-to-uniform"], "--pad-to-uniform"),
        (["--calib", "self"], "--calib self"),
        (["--allocation", "search"], "--allocation search"),
        (["--target-ratio", "0.2"], "--target-ratio"),
    ],
)
def test_what_the_streamed_path_cannot_do_is_a_bad_argument(tiny_checkpoint, tmp_path, calib, capsys, extra, words):
    out = tmp_path / "out"
    assert _prune(tiny_checkpoint, out, calib, "--offload", "always", *extra) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert words in line and "--offload never" in line
    assert _nothing_left(out)


def test_offload_always_needs_safetensors(tiny_checkpoint, tmp_path, calib, capsys):
    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_checkpoint, legacy)
    state = AutoModelForCausalLM.from_pretrained(legacy).state_dict()
    (legacy / "model.safetensors").unlink()
    torch.save(state, legacy / "pytorch_model.bin")
    out = tmp_path / "out"
    assert _prune(legacy, out, calib, "--offload", "always") == 2
    assert "safetensors" in _one_error_line(capsys.readouterr().err)
    assert _nothing_left(out)


def test_non_positive_memory_budget_is_a_bad_argument(tiny_checkpoint, tmp_path, calib, capsys):
    out = tmp_path / "out"
    assert _prune(tiny_checkpoint, out, calib, "--max-host-memory", "0") == 2
    assert "--max-host-memory" in _one_error_line(capsys.readouterr().err)
    assert _nothing_left(out)


def test_eval_streamed_gives_the_in_memory_perplexity(tiny_checkpoint, tmp_path, capsys):
    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    text = tmp_path / "t.txt"
    text.write_text("Some text to score, streamed one layer at a time. " * 60)
    args = ["eval", str(checkpoint), "--ppl", str(text), "--seq-len", "16", "--dtype", "float32"]
    assert main([*args, "--offload", "never"]) == 0
    resident = json.loads((checkpoint / "eval.json").read_text())["perplexity"][str(text)]
    assert main([*args, "--max-host-memory", "1e-6"]) == 0  # auto: the model exceeds the budget
    assert "streamed" in capsys.readouterr().out
    streamed = json.loads((checkpoint / "eval.json").read_text())["perplexity"][str(text)]
    assert streamed["n_windows"] == resident["n_windows"] > 1
    assert streamed["perplexity"] == pytest.approx(resident["perplexity"], rel=1e-6)


def test_eval_streamed_refuses_whole_model_tasks(tiny_checkpoint, tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"context": "The sky is", "choices": [" blue", " green"], "label": 0}) + "\n")
    assert main(["eval", str(tiny_checkpoint), "--tasks", str(task), "--offload", "always"]) == 2
    assert "--offload never" in _one_error_line(capsys.readouterr().err)
