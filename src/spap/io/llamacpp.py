"""GGUF export through llama.cpp's own converter (``convert_hf_to_gguf.py``), never a GGUF writer of ours.

The converter comes from the llama-cpp-python source distribution on PyPI (it vendors llama.cpp with
``convert_hf_to_gguf.py``, its ``conversion/`` package and ``gguf-py``): fetched once with pip into
spap's cache, or given with ``converter=``. It runs in a subprocess with this Python; its GGUF is
written under a temporary name and renamed into place.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .models import cache_root

LLAMA_CPP_PYTHON = "0.3.36"
"""The llama-cpp-python release whose vendored converter spap's export was tested with."""
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")
_VENDORED = "vendor/llama.cpp/"
_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
_SAFE_EXTRACT: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12


def download_sdist(version: str, into: Path) -> Path:
    """The llama-cpp-python ``version`` source archive, downloaded by pip into ``into``."""
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(into)]
    done = subprocess.run([*pip, f"llama-cpp-python=={version}"], capture_output=True, text=True)
    archives = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not archives:
        last = (done.stderr.strip().splitlines() or ["no archive"])[-1]
        raise RuntimeError(f"pip download llama-cpp-python=={version}: {last}")
    return archives[0]


def converter_path(version: str = LLAMA_CPP_PYTHON) -> Path:
    """``convert_hf_to_gguf.py`` of llama-cpp-python ``version``, fetched into the cache if absent."""
    home = cache_root() / f"llama.cpp-{version}"
    script = home / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    with tempfile.TemporaryDirectory(prefix="spap-llama-cpp-") as tmp:
        try:
            sdist = download_sdist(version, Path(tmp))
        except RuntimeError as exc:
            raise RuntimeError(
                f"could not fetch llama.cpp's converter ({exc}); "
                "pass converter=/path/to/llama.cpp/convert_hf_to_gguf.py (--converter)"
            ) from None
        staging = Path(tempfile.mkdtemp(prefix=f".llama.cpp-{version}.tmp-", dir=_mkdir(cache_root())))
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                inner = member.name.split(_VENDORED, 1)[1] if _VENDORED in member.name else None
                if inner and inner.startswith(_PARTS) and (member.isfile() or member.isdir()):
                    member.name = inner
                    archive.extract(member, staging, **_SAFE_EXTRACT)
        if not (staging / "convert_hf_to_gguf.py").is_file():
            shutil.rmtree(staging, ignore_errors=True)
            raise RuntimeError(f"llama-cpp-python {version} holds no {_VENDORED}convert_hf_to_gguf.py")
        try:
            staging.rename(home)
        except OSError:  # another run fetched it meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    return script


def _needs_byte_level_vocab(config: dict[str, Any], checkpoint: Path) -> bool:
    """Whether ``checkpoint``, converted with ``config``, is DeciLM with a byte-level BPE tokenizer,
    whose vocabulary llama.cpp's DeciLM converter (``conversion/deci.py``) writes for LLaMA-3's 128,256
    tokens only: it is converted through ``llamacpp_shim``. Other tokenizers than BPE (with or without
    byte fallback) are refused before the converter fails on them."""
    if config.get("model_type") != "nemotron-nas" or config.get("vocab_size") == 128256:
        return False
    tokenizer = checkpoint / "tokenizer.json"
    model = json.loads(tokenizer.read_text()).get("model", {}) if tokenizer.is_file() else {}
    if model.get("type") != "BPE":
        raise UsageError(
            f"llama.cpp's DeciLM converter takes a BPE tokenizer (tokenizer.json), and {checkpoint} has "
            f"none ({config.get('vocab_size')} tokens); serve this export with vLLM, or export a "
            "stock-shaped checkpoint (--pad-to-uniform) to GGUF"
        )
    return not model.get("byte_fallback", False)


def heads_resized_qwen2(config: dict[str, Any]) -> bool:
    """Whether ``config`` is a Qwen2 whose attention width (heads x head_dim) differs from hidden_size,
    as after head pruning. llama.cpp's Qwen2 graph sizes the query and output projections hidden x
    hidden, and vLLM's Qwen2 derives head_dim as hidden / heads: neither runs it as Qwen2. It is LLaMA
    with q/k/v biases, which both run with any head count (GGUF export: as LLaMA; vLLM: DeciLM)."""
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if config.get("model_type") != "qwen2" or not heads or not hidden:
        return False
    return _head_dim(config) * heads != hidden


def _head_dim(config: dict[str, Any]) -> int:
    """The attention head size ``config`` states, else hidden_size / num_attention_heads (transformers' rule)."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _converter_config(config: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """The config llama.cpp's converter should read for ``checkpoint``: ``config`` itself, with
    ``architectures`` filled in from ``model_type`` where it is missing (which the converter needs; e.g. a
    checkpoint converted from GGUF by spap before 2026-12-06), and a heads-pruned Qwen2 relabelled LLaMA
    (same weights: the converter permutes q/k rows, biases included, for llama.cpp's rotary layout).
    Per-layer shapes (spap's checkpoints with ``REMOTE_CODE_FILE``) are shown as DeciLM, which llama.cpp
    runs as its ``deci`` architecture."""
    from .checkpoint import REMOTE_CODE_FILE

    if (checkpoint / REMOTE_CODE_FILE).exists():
        from .decilm import decilm_config

        try:
            return {k: v for k, v in decilm_config(checkpoint).items() if k != "auto_map"}
        except UsageError as exc:
            raise UsageError(
                f"{checkpoint} has per-layer shapes, which llama.cpp holds only as DeciLM: {exc}; "
                "or prune with --pad-to-uniform"
            ) from None
    config = dict(config)
    if not config.get("architectures"):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type", ""))
        if name is None:
            raise UsageError(f"{checkpoint}/config.json names no architectures and no known causal-LM model_type")
        config["architectures"] = [name]
    if heads_resized_qwen2(config):
        config.update(model_type="llama", architectures=["LlamaForCausalLM"], head_dim=_head_dim(config))
    return config


@contextmanager
def _converter_view(checkpoint: Path, config: dict[str, Any], seen: dict[str, Any]) -> Iterator[Path]:
    """``checkpoint``, or where the converter should read ``seen`` instead of its ``config`` a temporary
    view of it: links to its files and that config. The checkpoint is not modified."""
    if seen == config:
        yield checkpoint
        return
    with tempfile.TemporaryDirectory(prefix="spap-export-") as tmp:
        view = Path(tmp)
        for item in checkpoint.iterdir():
            if item.name != "config.json":
                (view / item.name).symlink_to(item.resolve())
        (view / "config.json").write_text(json.dumps(seen, indent=2))
        yield view


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def export_gguf(
    checkpoint: str | Path,
    out_file: str | Path,
    outtype: str = "bf16",
    converter: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert the checkpoint directory ``checkpoint`` to the GGUF file ``out_file`` with llama.cpp's
    converter (per-layer shapes as DeciLM: MLP widths in multiples of 256, whole KV groups). Bad
    arguments raise ``UsageError`` before any work; a failed conversion leaves no file."""
    checkpoint, out_file = Path(checkpoint), Path(out_file)
    if not (checkpoint / "config.json").is_file():
        raise UsageError(f"{checkpoint} is not a checkpoint directory (no config.json)")
    config = json.loads((checkpoint / "config.json").read_text())
    seen = _converter_config(config, checkpoint)
    byte_level = _needs_byte_level_vocab(seen, checkpoint)
    if outtype not in OUTTYPES:
        raise UsageError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    if out_file.exists() and not overwrite:
        raise UsageError(f"{out_file} exists; pass --overwrite to replace it")
    if importlib.util.find_spec("sentencepiece") is None:
        raise UsageError("llama.cpp's converter needs sentencepiece: pip install sentencepiece (or 'spap[export]')")
    script = Path(converter) if converter is not None else converter_path()
    if not script.is_file():
        raise UsageError(f"converter not found: {script}")
    _mkdir(out_file.parent)
    partial = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    try:
        with _converter_view(checkpoint, config, seen) as source:
            shim = ["-m", "spap.io.llamacpp_shim"] if byte_level else []
            command = [sys.executable, *shim, str(script), str(source), "--outfile", str(partial), "--outtype", outtype]
            done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not partial.is_file():
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()] or ["no output file"]
            raise RuntimeError(f"llama.cpp's converter failed on {checkpoint}: {lines[-1]}")
        os.replace(partial, out_file)
    finally:
        partial.unlink(missing_ok=True)
    return out_file
