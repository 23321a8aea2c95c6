"""What a user sees when things go wrong, and what the CLI leaves behind: one line on stderr, exit
status 2 (bad arguments) or 1 (runtime failure) or 130/143 (interrupted), no output directory and
no temporary directory in any of these.  Also the written checkpoint's dtype, modes and determinism."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from spap.cli import main


@pytest.fixture()
def calib(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    return text


def _prune(model, out, calib, *extra: str) -> int:
    args = ["prune", str(model), "--sparsity", "0.25", "--out", str(out), "--calib", str(calib)]
    return main([*args, "--n-samples", "4", "--seq-len", "32", "--compute-dtype", "float32", *extra])


def _nothing_left(out) -> bool:
    """No output directory and no temporary sibling of it."""
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("spap: ") or "Traceback" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [("--seq-len", "0", "seq_len"), ("--n-samples", "0", "n_samples"), ("--batch-size", "0", "batch_size")],
)
def test_non_positive_sizes_are_bad_arguments(tiny_checkpoint, tmp_path, calib, capsys, flag, value, words):
    out = tmp_path / "out"
    assert _prune(tiny_checkpoint, out, calib, flag, value) == 2
    assert words in _one_error_line(capsys.readouterr().err)
    assert _nothing_left(out)


def test_truncated_safetensors_is_a_runtime_failure_with_advice(tiny_checkpoint, tmp_path, calib, capsys):
    model = _copy(tiny_checkpoint, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    assert _prune(model, out, calib) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "truncated or corrupt" in line or "could not load" in line, line
    assert _nothing_left(out)


def test_non_finite_weights_fail_cleanly(tiny_checkpoint, tmp_path, calib, capsys):
    model = _copy(tiny_checkpoint, tmp_path / "model")
    tensors = load_file(model / "model.safetensors")
    name = next(n for n in tensors if "layers.0.mlp.up_proj" in n)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert _prune(model, out, calib) == 1
    assert "NaN or inf" in _one_error_line(capsys.readouterr().err)
    assert _nothing_left(out)


def test_full_disk_leaves_nothing(tiny_checkpoint, tmp_path, calib, capsys, monkeypatch):
    def no_space(self, directory, **kwargs):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "model.safetensors"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", no_space)
    out = tmp_path / "out"
    assert _prune(tiny_checkpoint, out, calib) == 1
    assert "no space left" in _one_error_line(capsys.readouterr().err)
    assert _nothing_left(out)


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupted_write_leaves_nothing(tiny_checkpoint, tmp_path, calib, capsys, monkeypatch, signum, status):
    def interrupted(self, directory, **kwargs):
        (directory / "model.safetensors").write_bytes(b"partial")
        os.kill(os.getpid(), signum)  # delivered to this (main) thread before kill returns

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", interrupted)
    out = tmp_path / "out"
    assert _prune(tiny_checkpoint, out, calib) == status
    assert "interrupted" in _one_error_line(capsys.readouterr().err)
    assert _nothing_left(out)
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is restored


def test_unreadable_calibration_is_a_bad_argument(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert _prune(tiny_checkpoint, out, tmp_path / "absent.txt") == 2
    assert "not found" in _one_error_line(capsys.readouterr().err)
    binary = tmp_path / "calib.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    assert _prune(tiny_checkpoint, out, binary) == 2
    assert "not UTF-8 text" in _one_error_line(capsys.readouterr().err)
    assert _nothing_left(out)


def test_debug_shows_the_traceback(tiny_checkpoint, tmp_path, calib, capsys):
    model = _copy(tiny_checkpoint, tmp_path / "model")
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    args = ["--debug", "prune", str(model), "--out", str(tmp_path / "out"), "--calib", str(calib), "--seq-len", "32"]
    assert main(args) == 1
    assert "Traceback" in capsys.readouterr().err


def _bf16_checkpoint(tiny_checkpoint, tmp_path):
    from spap.io.checkpoint import load_pretrained

    model = load_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    path = tmp_path / "bf16"
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny_checkpoint / name).is_file():
            shutil.copy(tiny_checkpoint / name, path / name)
    return path


def _digest(directory) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


def test_checkpoint_keeps_the_input_dtype_with_usual_modes(tiny_checkpoint, tmp_path, calib):
    source = _bf16_checkpoint(tiny_checkpoint, tmp_path)
    out = tmp_path / "out"
    assert _prune(source, out, calib) == 0
    dtypes = {t.dtype for t in load_file(out / "model.safetensors").values()}
    assert dtypes == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "pruning.json").read_text())["command"].startswith(f"spap prune {source}")
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for file in out.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file.name
    as_float = tmp_path / "float32"
    assert _prune(source, as_float, calib, "--save-dtype", "float32") == 0
    assert {t.dtype for t in load_file(as_float / "model.safetensors").values()} == {torch.float32}


def test_same_command_and_seed_write_identical_bytes(tiny_checkpoint, tmp_path, calib):
    first, second = tmp_path / "first", tmp_path / "second"
    assert _prune(tiny_checkpoint, first, calib, "--seed", "3") == 0
    assert _prune(tiny_checkpoint, second, calib, "--seed", "3") == 0
    assert _digest(first) == _digest(second)
