"""Bad input and faults, tried as a user would: each is refused in one line on stderr (exit 2 for a
bad argument or path, 1 for a broken input or runtime failure) before any work, leaves nothing
behind, and never yields a result that could be silently wrong."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from spap.cli import main
from spap.io.atomic import atomic_directory, owned_tempdir, remove_dead_leftovers
from spap.runtime import spill

from .test_cli_failures import _nothing_left, _one_error_line, _prune


@pytest.fixture()
def calib(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    return text


@pytest.fixture()
def text(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("Some text to score, one window after another. " * 60)
    return path


def _eval(model, text, *extra: str) -> int:
    return main(["eval", str(model), "--ppl", str(text), "--seq-len", "16", "--dtype", "float32", *extra])


def _edit_tensors(model, edit) -> None:
    tensors = load_file(model / "model.safetensors")
    edit(tensors)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def _edit_config(model, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# 1. concurrent writers


def test_the_final_rename_never_replaces_a_checkpoint_written_meanwhile(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(FileExistsError, match="another run"):
        with atomic_directory(target) as tmp:
            (tmp / "mine").write_text("loser")
            target.mkdir()
            (target / "theirs").write_text("winner")
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left


@pytest.mark.parametrize("offload", ["never", "always"])
def test_a_second_writer_to_one_out_fails_and_keeps_the_first_checkpoint(
    tiny_checkpoint, tmp_path, calib, capsys, monkeypatch, offload
):
    """The other run renames its checkpoint into place while this one writes its own."""
    out = tmp_path / "out"
    import spap.io.shards

    owner, method = (
        (spap.io.shards.ShardWriter, "close") if offload == "always" else (PreTrainedModel, "save_pretrained")
    )
    real = getattr(owner, method)

    def other_run_finishes_first(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        out.mkdir()
        (out / "config.json").write_text("{}")
        return result

    monkeypatch.setattr(owner, method, other_run_finishes_first)
    assert _prune(tiny_checkpoint, out, calib, "--offload", offload) == 2
    assert "written by another run" in _one_error_line(capsys.readouterr().err)
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# 2, 3. tensors that do not match config.json: refused before any work, in memory and streamed


def _missing(model):
    _edit_tensors(model, lambda t: t.pop("model.layers.0.mlp.down_proj.weight"))
    return "1 missing (e.g. model.layers.0.mlp.down_proj.weight)"


def _unexpected(model):
    _edit_tensors(model, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(3)}))
    return "1 unexpected (e.g. model.layers.0.mlp.extra.weight)"


def _fewer_layers(model):
    _edit_config(model, num_hidden_layers=2)
    return "unexpected (e.g. model.layers.2."


def _other_width(model):
    _edit_config(model, intermediate_size=40)
    return "of another shape (e.g. model.layers.0.mlp."


@pytest.mark.parametrize("damage", [_missing, _unexpected, _fewer_layers, _other_width])
@pytest.mark.parametrize("offload", ["never", "always"])
def test_tensors_that_do_not_match_the_config_are_refused(
    tiny_checkpoint, tmp_path, calib, text, capsys, damage, offload
):
    model = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    (model / "eval.json").unlink(missing_ok=True)  # earlier tests may have evaluated the fixture
    words = damage(model)
    out = tmp_path / "out"
    assert _prune(model, out, calib, "--offload", offload) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "do not match config.json" in line and words in line, line
    assert _nothing_left(out)
    assert _eval(model, text, "--offload", offload) == 1
    assert words in _one_error_line(capsys.readouterr().err)
    assert not (model / "eval.json").exists()


@pytest.mark.parametrize("offload", ["never", "always"])
def test_non_finite_weights_are_named_in_memory_and_streamed(tiny_checkpoint, tmp_path, calib, text, capsys, offload):
    model = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    _edit_tensors(model, lambda t: t["model.layers.1.self_attn.o_proj.weight"].__setitem__((0, 0), float("inf")))
    assert _prune(model, tmp_path / "out", calib, "--offload", offload) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "model.layers.1.self_attn.o_proj.weight holds NaN or inf" in line, line
    assert _eval(model, text, "--offload", offload) == 1
    assert "holds NaN or inf" in _one_error_line(capsys.readouterr().err)


# 4, 7. numbers out of range


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "lots"])
def test_memory_budget_must_be_a_finite_positive_number(tiny_checkpoint, tmp_path, calib, text, capsys, value):
    out = tmp_path / "out"
    assert _prune(tiny_checkpoint, out, calib, "--max-host-memory", value) == 2
    assert "--max-host-memory" in _one_error_line(capsys.readouterr().err)
    assert _nothing_left(out)
    assert _eval(tiny_checkpoint, text, "--max-host-memory", value) == 2
    assert "--max-host-memory" in _one_error_line(capsys.readouterr().err)


def test_windows_longer_than_the_model_s_positions_are_refused(tiny_checkpoint, tmp_path, calib, text, capsys):
    out = tmp_path / "out"
    assert _prune(tiny_checkpoint, out, calib, "--seq-len", "256") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--seq-len 256 exceeds the 128 positions" in line and "--seq-len 128 or less" in line, line
    assert _prune(tiny_checkpoint, out, calib, "--eval", "--ppl-seq-len", "129") == 2
    assert "--ppl-seq-len 129 exceeds" in _one_error_line(capsys.readouterr().err)
    assert _nothing_left(out)
    assert _eval(tiny_checkpoint, text, "--seq-len", "512") == 2
    assert "--seq-len 512 exceeds" in _one_error_line(capsys.readouterr().err)


# 5, 11. --config


def test_flags_given_with_config_override_the_file(tiny_checkpoint, tmp_path, calib):
    config = tmp_path / "cfg.json"
    solver = {"method": "wanda-sp"}
    config.write_text(json.dumps({"sparsity": 0.5, "seed": 7, "solver": solver, "calibration": {"n_samples": 3}}))
    out = tmp_path / "out"
    assert _prune(tiny_checkpoint, out, calib, "--config", str(config)) == 0  # _prune passes --sparsity 0.25
    recorded = json.loads((out / "pruning.json").read_text())["config"]
    assert recorded["sparsity"] == 0.25 and recorded["calibration"]["n_samples"] == 4  # flags win
    assert recorded["seed"] == 7 and recorded["solver"]["method"] == "wanda-sp"  # the file's, not the defaults
    assert recorded["calibration"]["source"] == str(calib)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ('{"batch_size": "8"}', 'config field runtime.batch_size must be an integer, got "8"'),  # version 2's place
        ('{"calibration": "bundled"}', "config field calibration must be a JSON object"),
        ('{"solver": {"refit_rounds": 2.5}}', "config field solver.refit_rounds must be an integer"),
        ('{"sparsity": 0.3,}', "not valid JSON"),
        ('{"sparsity": 0.3, "sparsty": 0.5}', "unknown PruneConfig fields: sparsty"),
    ],
)
def test_a_bad_config_file_is_named_with_the_field(tiny_checkpoint, tmp_path, calib, capsys, content, words):
    config = tmp_path / "cfg.json"
    config.write_text(content)
    out = tmp_path / "out"
    assert _prune(tiny_checkpoint, out, calib, "--config", str(config)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"--config {config}" in line and words in line, line
    assert _nothing_left(out)


# 6, 10. paths that are not what they should be


def test_text_that_is_no_text_is_refused_before_the_model_loads(tiny_checkpoint, tmp_path, capsys):
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\t\n   \n")
    out = tmp_path / "out"
    assert _prune(tiny_checkpoint, out, blank) == 2
    assert "holds no text" in _one_error_line(capsys.readouterr().err)
    assert _prune(tiny_checkpoint, out, tmp_path) == 2
    assert f"{tmp_path} is a directory; pass a text file" in _one_error_line(capsys.readouterr().err)
    assert _nothing_left(out)
    assert _eval(tiny_checkpoint, blank) == 2
    assert "--ppl" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("offload", ["never", "always"])
def test_shards_without_their_index_are_named(tiny_checkpoint, tmp_path, calib, capsys, offload):
    from spap.io.checkpoint import load_pretrained

    model = tmp_path / "sharded"
    load_pretrained(tiny_checkpoint).save_pretrained(model, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_checkpoint / name, model / name)
    (model / "model.safetensors.index.json").unlink()
    out = tmp_path / "out"
    assert _prune(model, out, calib, "--offload", offload) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "has safetensors shards" in line and "no model.safetensors.index.json" in line, line
    assert _nothing_left(out)


def test_a_corrupt_config_json_is_named_not_blamed_on_the_network(tiny_checkpoint, tmp_path, calib, text, capsys):
    model = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    (model / "config.json").write_text('{"model_type": "llama", ')
    assert _prune(model, tmp_path / "out", calib) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "config.json is not valid JSON" in line and "network" not in line, line
    assert _eval(model, text) == 1
    assert "config.json is not valid JSON" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("how", ["truncated", "not gguf"])
def test_a_broken_gguf_file_is_named(tmp_path, calib, capsys, monkeypatch, how):
    import gguf

    monkeypatch.setenv("SPAP_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\0" * len(data))
    out = tmp_path / "out"
    assert _prune(path, out, calib) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"{path} is not a readable GGUF file" in line and "error: error" not in line, line
    assert _nothing_left(out)
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.iterdir())  # no half-converted model cached


# 8. full disks


def test_a_full_disk_under_out_is_not_blamed_on_the_input(tiny_checkpoint, tmp_path, calib, capsys, monkeypatch):
    def full(self, directory, **kwargs):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    out = tmp_path / "out"
    assert _prune(tiny_checkpoint, out, calib) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "no space left on the device" in line and "--out" in line and "corrupt" not in line, line
    assert _nothing_left(out)


def test_a_full_spill_directory_says_so(tiny_checkpoint, tmp_path, calib, capsys, monkeypatch):
    def enforce_fail(obj, path):
        open(path, "wb").close()
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(spill.torch, "save", enforce_fail)
    monkeypatch.setattr(spill.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9, 0))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = tmp_path / "out"
    assert _prune(tiny_checkpoint, out, calib, "--offload", "never", "--max-host-memory", "1e-6") == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "no space left for calibration activations" in line and "TMPDIR" in line, line
    assert _nothing_left(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("spap-activations-")]


# 9. leftovers of killed runs


def test_only_the_leftovers_of_dead_processes_of_this_machine_are_removed(tmp_path):
    dead, live = owned_tempdir("x-", tmp_path), owned_tempdir("x-", tmp_path)
    dead = dead.rename(tmp_path / dead.name.replace(f"x-{os.getpid()}-", f"x-{_dead_pid()}-"))
    parent_pid = os.getppid()
    parent = live.rename(tmp_path / live.name.replace(f"x-{os.getpid()}-", f"x-{parent_pid}-"))
    mine = owned_tempdir("x-", tmp_path)
    foreign = tmp_path / f"x-{_dead_pid()}-00000000-abc"
    other_form = tmp_path / "x-old-style"
    foreign.mkdir(), other_form.mkdir()
    assert remove_dead_leftovers(tmp_path, "x-") == [dead]
    assert {p.name for p in tmp_path.iterdir()} == {parent.name, mine.name, foreign.name, other_form.name}


def test_the_next_run_removes_what_a_killed_run_left(tiny_checkpoint, tmp_path, calib):
    env = {**os.environ, "TMPDIR": str(tmp_path / "spill")}
    (tmp_path / "spill").mkdir()
    out = tmp_path / "out"
    args = ["prune", str(tiny_checkpoint), "--out", str(out), "--calib", str(calib), "--seq-len", "32"]
    args += ["--n-samples", "4", "--offload", "always", "--max-host-memory", "1e-6", "--refit-rounds", "400"]
    args += ["--refit-min-gain", "0", "--refit-patience", "0"]  # long enough to be killed mid-run
    run = subprocess.Popen([sys.executable, "-m", "spap.cli", *args], env=env, stderr=subprocess.DEVNULL)

    def leftovers():
        spilled = list((tmp_path / "spill").glob("spap-activations-*"))
        return spilled + [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]

    deadline = time.monotonic() + 120
    while len(leftovers()) < 2 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert len(leftovers()) == 2, "the run ended before both directories existed"
    monkeypatch_tmp = pytest.MonkeyPatch()
    monkeypatch_tmp.setattr(tempfile, "tempdir", str(tmp_path / "spill"))
    try:
        assert _prune(tiny_checkpoint, out, calib, "--offload", "always", "--max-host-memory", "1e-6") == 0
    finally:
        monkeypatch_tmp.undo()
    assert leftovers() == [] and (out / "config.json").is_file()


def test_configs_of_every_version_load_and_newer_ones_are_refused():
    from spap.config import CONFIG_VERSION, PruneConfig

    written = PruneConfig(sparsity=0.2, drop_layers=1).to_dict()
    assert written["version"] == CONFIG_VERSION and PruneConfig.from_dict(written).drop_layers == 1
    first = {k: v for k, v in written.items() if k not in ("version", "drop_layers", "target_ratio")}
    assert PruneConfig.from_dict(first) == PruneConfig(sparsity=0.2)  # a version-1 pruning.json's config
    with pytest.raises(ValueError, match="config version 99"):
        PruneConfig.from_dict({**written, "version": 99})
