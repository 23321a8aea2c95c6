"""``spap export --format gguf``: llama.cpp's own converter, fetched once from the llama-cpp-python
sdist, run on stock checkpoints only; the GGUF appears whole or not at all."""

from __future__ import annotations

import io
import json
import sys
import tarfile
import textwrap

import pytest

from spap.cli import main
from spap.io import llamacpp

from ..cli.test_cli_failures import _one_error_line

FAKE_CONVERTER = textwrap.dedent(
    """
    import json, os, sys
    args = sys.argv[1:]
    out = args[args.index("--outfile") + 1]
    if "fail" in args[0]:
        print("ValueError: cannot convert this model", file=sys.stderr)
        open(out, "wb").write(b"partial")
        sys.exit(1)
    seen = {
        "source": args[0],
        "outtype": args[args.index("--outtype") + 1],
        "architectures": json.load(open(os.path.join(args[0], "config.json")))["architectures"],
        "files": sorted(os.listdir(args[0])),
    }
    open(out, "w").write(json.dumps(seen))
    """
)


@pytest.fixture()
def converter(tmp_path):
    script = tmp_path / "convert_hf_to_gguf.py"
    script.write_text(FAKE_CONVERTER)
    return script


def _checkpoint(path, config='{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}'):
    path.mkdir()
    (path / "config.json").write_text(config)
    return path


def test_export_runs_the_converter_and_writes_the_file_whole(tmp_path, converter, capsys):
    checkpoint = _checkpoint(tmp_path / "model")
    args = ["export", str(checkpoint), "--outtype", "q8_0", "--converter", str(converter)]
    assert main(args) == 0
    seen = json.loads((checkpoint / "model-q8_0.gguf").read_text())
    assert seen == {
        "source": str(checkpoint),
        "outtype": "q8_0",
        "architectures": ["LlamaForCausalLM"],
        "files": ["config.json"],
    }
    assert main(args) == 2  # exists
    assert "--overwrite" in _one_error_line(capsys.readouterr().err)
    failing = _checkpoint(tmp_path / "fail-model")
    assert main(["export", str(failing), "--converter", str(converter)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "converter failed" in line and "cannot convert this model" in line, line
    assert list(failing.iterdir()) == [failing / "config.json"]  # no partial GGUF


def test_a_config_without_architectures_reaches_the_converter_with_them(tmp_path, converter):
    """llama.cpp's converter reads ``architectures``; a config without it (spap's GGUF conversions before
    2026-12-06 wrote none) is given the model_type's causal-LM class in a view, the checkpoint untouched."""
    checkpoint = _checkpoint(tmp_path / "model", '{"model_type": "qwen2"}')
    (checkpoint / "model.safetensors").write_text("weights")
    out = tmp_path / "out" / "model.gguf"
    llamacpp.export_gguf(checkpoint, out, converter=converter)
    seen = json.loads(out.read_text())
    assert seen["architectures"] == ["Qwen2ForCausalLM"] and seen["files"] == ["config.json", "model.safetensors"]
    assert (checkpoint / "config.json").read_text() == '{"model_type": "qwen2"}'
    assert sorted(p.name for p in checkpoint.iterdir()) == ["config.json", "model.safetensors"]


def test_a_heads_pruned_qwen2_reaches_the_converter_as_llama(tmp_path, converter):
    """llama.cpp's Qwen2 graph sizes q and o ``hidden x hidden``: 7 heads of 64 in a 896-wide model
    fail to load there, so the converter is shown LLaMA (q/k/v biases and any head count); a Qwen2 with
    all its heads keeps its own architecture."""
    pruned = '{"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, '
    for name, config, expected in [
        ("pruned", pruned + '"num_attention_heads": 7, "head_dim": 64}', ["LlamaForCausalLM"]),
        ("implicit", pruned + '"num_attention_heads": 14}', ["Qwen2ForCausalLM"]),
        ("dense", pruned + '"num_attention_heads": 14, "head_dim": 64}', ["Qwen2ForCausalLM"]),
    ]:
        out = tmp_path / f"{name}.gguf"
        llamacpp.export_gguf(_checkpoint(tmp_path / name, config), out, converter=converter)
        assert json.loads(out.read_text())["architectures"] == expected, name
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["model_type"] == "qwen2"


def test_the_converter_is_fetched_once_from_the_sdist(tmp_path, monkeypatch):
    monkeypatch.setenv("SPAP_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_pip(command, **kwargs):
        calls.append(command)
        destination = command[command.index("-d") + 1]
        root = f"llama_cpp_python-{llamacpp.LLAMA_CPP_PYTHON}/"
        with tarfile.open(f"{destination}/{root[:-1]}.tar.gz", "w:gz") as archive:
            for name, text in [
                ("vendor/llama.cpp/convert_hf_to_gguf.py", "print('converter')"),
                ("vendor/llama.cpp/conversion/llama.py", "# family"),
                ("vendor/llama.cpp/gguf-py/gguf/__init__.py", "# gguf"),
                ("vendor/llama.cpp/ggml/src/ggml.c", "/* not needed */"),
            ]:
                info = tarfile.TarInfo(root + name)
                info.size = len(text)
                archive.addfile(info, io.BytesIO(text.encode()))

        class Done:
            returncode, stderr = 0, ""

        return Done()

    monkeypatch.setattr(llamacpp.subprocess, "run", fake_pip)
    script = llamacpp.converter_path()
    assert script.read_text() == "print('converter')" and llamacpp.converter_path() == script
    home = script.parent
    assert (home / "conversion" / "llama.py").is_file() and (home / "gguf-py" / "gguf" / "__init__.py").is_file()
    assert not (home / "ggml").exists()
    assert (
        len(calls) == 1
        and calls[0][0] == sys.executable
        and f"llama-cpp-python=={llamacpp.LLAMA_CPP_PYTHON}" in calls[0]
    )
