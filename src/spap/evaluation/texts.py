"""Perplexity on a list of text sources, as ``spap prune --eval`` and ``spap eval`` report it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UsageError

log = logging.getLogger(__name__)

BUNDLED_HELDOUT = "bundled-heldout"


def check_texts(files: list[str] | None) -> list[str]:
    """The text sources to score (default: the bundled held-out text), each readable as text now."""
    from ..io.calibration import read_text_file

    sources = files or [BUNDLED_HELDOUT]
    for src in sources:
        if src != BUNDLED_HELDOUT:
            try:
                read_text_file(src)
            except (OSError, ValueError) as exc:
                raise UsageError(f"--ppl: {exc}") from None
    return sources


def perplexities(
    model: Any,
    tokenizer: Any,
    sources: list[str],
    seq_len: int,
    dtype: str,
    max_windows: int | None = None,
    score_from: int = 0,
    streamed_from: str | None = None,
    device: str = "cpu",
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Perplexity of each text source, ``{source: PerplexityResult.to_dict()}``; ``streamed_from`` (a
    checkpoint directory, ``model`` None): one decoder layer in memory at a time. Each result is
    also told to ``echo`` (default: the log) as one line."""
    from ..io.calibration import load_text
    from ..runtime.device import resolve_device, resolve_dtype
    from .perplexity import perplexity
    from .streamed import streamed_perplexity

    where = resolve_device(device) if model is None else next(model.parameters()).device
    options: dict[str, Any] = dict(dtype=resolve_dtype(dtype, where), max_windows=max_windows, score_from=score_from)
    out = {}
    for src in sources:
        text = load_text(src)
        if streamed_from is not None:
            result = streamed_perplexity(streamed_from, tokenizer, text, seq_len, device=where, **options)
        else:
            result = perplexity(model, tokenizer, text, seq_len, **options)
        out[src] = result.to_dict()
        scored = f", scored from position {score_from}" if score_from else ""
        (echo or log.info)(
            f"  perplexity {result.perplexity:9.3f}  ({Path(src).name}, seq_len {seq_len}, "
            f"{result.n_windows} windows{scored}, {result.dtype})"
        )
    return out
