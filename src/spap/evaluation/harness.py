"""lm-evaluation-harness on an in-memory or saved model (optional extra ``spap[eval]``)."""

from __future__ import annotations

from typing import Any


def run_harness(model, tokenizer, tasks: list[str], batch_size: int = 8, limit: int | None = None) -> dict[str, Any]:
    """lm_eval.simple_evaluate with HFLM wrapping ``model``; returns {task: {metric: value}}."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise RuntimeError(
            "--harness needs lm-evaluation-harness: pip install 'spap[eval]' (or pip install lm-eval)"
        ) from exc
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit)
    except Exception as exc:  # noqa: BLE001 - dataset download / task lookup failures vary by version
        raise RuntimeError(
            f"lm-eval could not run {tasks}: {exc}. Its datasets come from the Hugging Face hub; offline, "
            "point --tasks at local BIG-bench .json / .jsonl files instead (spap's built-in scorer)."
        ) from exc
    return {
        task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        for task, metrics in out["results"].items()
    }
