"""Perplexity over non-overlapping windows (stride = seq_len), the GPTQ/SparseGPT protocol."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..io.calibration import adds_bos, tokenize
from ..runtime.device import autocast_for


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    seq_len: int
    n_windows: int
    n_predicted_tokens: int
    dtype: str
    score_from: int = 0  # predictions made at window positions < score_from were not scored

    def to_dict(self) -> dict:
        return asdict(self)


def check_score_from(score_from: int, seq_len: int) -> None:
    """Raise unless 0 <= score_from < seq_len - 1 (every window must score at least one prediction)."""
    if not 0 <= score_from < seq_len - 1:
        raise ValueError(f"score_from must be in [0, seq_len - 1) = [0, {seq_len - 1}), got {score_from}")


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    seq_len: int = 2048,
    batch_size: int = 2,
    dtype: torch.dtype | None = None,
    max_windows: int | None = None,
    progress: bool = True,
    score_from: int = 0,
    max_logits_bytes: int = 2**28,
) -> PerplexityResult:
    """exp(mean NLL) over floor(T / seq_len) consecutive windows of the tokenised ``text``.

    Tokenizers that prepend BOS get BOS at the start of every window (then seq_len - 1 text tokens).
    Each window scores the predictions made at positions score_from .. seq_len - 2, i.e. the
    seq_len - 1 - score_from tokens that follow; 0 scores all of them (the GPTQ convention),
    seq_len // 2 only those with at least half a window of context (llama.cpp's ``perplexity``).
    The output head runs on slices of positions whose float32 logits fit in ``max_logits_bytes``, so
    memory does not grow with batch x seq_len x vocabulary (same NLL as scoring all at once).
    """
    check_score_from(score_from, seq_len)
    windows = text_windows(tokenizer, text, seq_len, max_windows)
    n = windows.shape[0]
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    batches = range(0, n, batch_size)
    for start in tqdm(batches, desc=f"ppl@{seq_len}", unit="batch", disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        with autocast_for(model, dtype):
            hidden = final_hidden_states(model, batch)[:, score_from:-1]
            targets = batch[:, score_from + 1 :].reshape(-1)
            total_nll += sliced_nll(model, hidden.reshape(-1, hidden.shape[-1]), targets, max_logits_bytes)
        total_tokens += targets.numel()
    model.train(was_training)
    nll = total_nll / total_tokens
    used = dtype or next(model.parameters()).dtype
    return PerplexityResult(math.exp(nll), nll, seq_len, n, total_tokens, str(used).replace("torch.", ""), score_from)


def text_windows(tokenizer: Any, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """(n, seq_len) token ids: consecutive non-overlapping windows of ``text``, each starting with BOS
    for tokenizers that prepend it (then seq_len - 1 text tokens); at most ``max_windows``."""
    ids = tokenize(tokenizer, text)
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    if bos is not None and ids.numel() and ids[0] == bos:
        ids = ids[1:]
    body = seq_len - (bos is not None)
    n = ids.numel() // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: n * body].view(n, body)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def final_hidden_states(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(B, S, d) hidden states the output head of ``model`` reads (the decoder's last output)."""
    hf: Any = model  # a transformers PreTrainedModel
    decoder = hf.get_decoder()
    return decoder(input_ids=ids, use_cache=False).last_hidden_state


def head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of ``hidden`` (n, d) as the model's forward computes them: output head, then the final
    soft-capping of the families that have one (Gemma 2/3)."""
    hf: Any = model
    head = hf.get_output_embeddings()
    logits = head(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def sliced_nll(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, max_logits_bytes: int) -> float:
    """sum_n -log softmax(head(hidden_n))[targets_n] over rows of ``hidden`` (n, d), computed in slices
    of rows whose float32 logits take at most ``max_logits_bytes``."""
    hf: Any = model
    vocab = hf.get_output_embeddings().weight.shape[0]
    rows = max(1, max_logits_bytes // (4 * vocab))
    total = 0.0
    for start in range(0, hidden.shape[0], rows):
        logits = head_logits(model, hidden[start : start + rows]).float()
        total += float(F.cross_entropy(logits, targets[start : start + rows], reduction="sum"))
    return total
