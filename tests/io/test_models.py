"""Model resolution: names that are no local path are checked against the hub cache and the hub at once."""

from __future__ import annotations

import huggingface_hub
import pytest
import torch

from spap.cli import main
from spap.io.models import resolve_model


def _no_cache(repo_id, filename, **kwargs):
    return None


def _unreachable(repo_id, **kwargs):
    raise ConnectionError("[Errno -2] Name or service not known")  # what httpx raises offline, in spirit


def test_unknown_name_fails_at_once_when_the_hub_is_unreachable(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", _no_cache)
    monkeypatch.setattr(huggingface_hub, "repo_exists", _unreachable)
    with pytest.raises(FileNotFoundError, match="no such local path.*could not be asked.*Name or service"):
        resolve_model("my-pruned-modle")
    # The CLI reports it before any download attempt (no from_pretrained, so no retries) and writes nothing.
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "my-pruned-modle"]) == 2
    err = capsys.readouterr().err
    assert "no such local path" in err and "Loading weights" not in err
    assert main(["prune", "my-pruned-modle", "--out", "never"]) == 2
    assert not (tmp_path / "never").exists()


def test_unknown_name_on_a_reachable_hub_says_the_hub_has_no_such_model(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", _no_cache)
    monkeypatch.setattr(huggingface_hub, "repo_exists", lambda repo_id, **kwargs: False)
    with pytest.raises(FileNotFoundError, match="the hub has no such model"):
        resolve_model("someone/missing-model")


def test_hub_models_in_the_cache_or_on_the_hub_resolve_to_their_id(monkeypatch):
    asked = []
    monkeypatch.setattr(huggingface_hub, "repo_exists", lambda repo_id, **kwargs: asked.append(repo_id) or True)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo_id, filename, **kw: "/cache/config.json")
    assert resolve_model("org/cached-model") == "org/cached-model"
    assert asked == []  # a cached model needs no network
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", _no_cache)
    assert resolve_model("org/online-model") == "org/online-model"
    assert asked == ["org/online-model"]


def test_names_that_cannot_be_hub_ids_are_missing_paths():
    for name in ["a b", "./missing-dir", "x/y/z"]:
        with pytest.raises(FileNotFoundError, match="model path not found"):
            resolve_model(name)


def test_gguf_cache_is_bfloat16_unless_float32_is_asked_for(monkeypatch, tmp_path):
    from spap.io import models

    monkeypatch.setenv("SPAP_CACHE", str(tmp_path))
    converted = []
    monkeypatch.setattr("spap.io.gguf.convert_gguf", lambda src, dst, dtype: converted.append((dst, dtype)))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"0" * 10)
    monkeypatch.delenv("SPAP_GGUF_DTYPE", raising=False)
    models.resolve_model(str(gguf))
    monkeypatch.setenv("SPAP_GGUF_DTYPE", "float32")
    models.resolve_model(str(gguf))
    assert converted == [(tmp_path / "gguf-m-10-bfloat16", torch.bfloat16), (tmp_path / "gguf-m-10", torch.float32)]
    monkeypatch.setenv("SPAP_GGUF_DTYPE", "fp8")
    with pytest.raises(ValueError, match="SPAP_GGUF_DTYPE"):
        models.resolve_model(str(gguf))
