"""Zero-shot multiple choice by log-likelihood, over local task files.

Formats
  * BIG-bench JSON: {"examples": [{"input": ..., "target_scores": {choice: 0/1}}], optional
    "task_prefix", "example_input_prefix" (default "\\nQ: "), "example_output_prefix" (default "\\nA: ")}.
  * JSONL: one {"context": ..., "choices": [...], "label": int} per line (the context is used verbatim).

For each choice c the score is log p(c | context), summed over c's tokens; ``acc`` takes the argmax,
``acc_norm`` the argmax of score / len(c in characters) (lm-evaluation-harness's definition).
Tokenizers that prepend BOS get it at the start of every scored sequence.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..io.calibration import adds_bos
from ..runtime.device import autocast_for


@dataclass
class Example:
    context: str
    choices: list[str]
    label: int


@dataclass
class TaskResult:
    task: str
    acc: float
    acc_norm: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def load_task(path: str | Path, limit: int | None = None) -> tuple[str, list[Example]]:
    """(task name, examples) from a BIG-bench .json or a .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    if path.suffix == ".jsonl":
        examples = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            try:
                examples.append(Example(row["context"], list(row["choices"]), int(row["label"])))
            except KeyError as exc:
                raise ValueError(f"{path}:{n}: JSONL rows need context, choices, label ({exc} missing)") from exc
        name = path.stem
    else:
        data = json.loads(path.read_text())
        if "examples" not in data:
            raise ValueError(f"{path}: not a BIG-bench task (no 'examples')")
        prefix = data.get("task_prefix", "")
        q = data.get("example_input_prefix", "\nQ: ")
        a = data.get("example_output_prefix", "\nA: ")
        examples = []
        for ex in data["examples"]:
            scores = ex["target_scores"]
            choices = list(scores)
            label = max(range(len(choices)), key=lambda i: scores[choices[i]])
            context = (prefix + q + ex["input"].strip() + a).lstrip()
            examples.append(Example(context, choices, label))
        name = data.get("name", path.stem)
    for ex in examples:
        if not 0 <= ex.label < len(ex.choices):
            raise ValueError(f"{path}: label {ex.label} out of range for {len(ex.choices)} choices")
    return name, examples[:limit] if limit else examples


def _continuation(context: str, choice: str) -> str:
    return choice if not context or context[-1].isspace() else " " + choice


def encode_pair(tokenizer, context: str, continuation: str, bos: int | None) -> tuple[list[int], int]:
    """(token ids of context + continuation, number of continuation tokens)."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        cont = whole[len(ctx) :]
    else:  # tokenisation merged across the boundary: encode separately
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    prefix = ([bos] if bos is not None else []) + ctx
    return prefix + cont, len(cont)


@torch.no_grad()
def continuation_logprobs(
    model,
    requests: list[tuple[list[int], int]],
    batch_size: int = 16,
    max_len: int = 2048,
    progress: bool = True,
    dtype: torch.dtype | None = None,
) -> list[float]:
    """Summed log-probabilities of the last n tokens of each (ids, n) request."""
    device = next(model.parameters()).device
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    out = [0.0] * len(requests)
    for start in tqdm(range(0, len(order), batch_size), desc="score", unit="batch", disable=not progress):
        idx = order[start : start + batch_size]
        seqs = [requests[i][0][-max_len:] for i in idx]
        width = max(len(s) for s in seqs)
        batch = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, s in enumerate(seqs):
            batch[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        with autocast_for(model, dtype):
            logits = model(input_ids=batch.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        logp = F.log_softmax(logits, dim=-1)
        for row, (i, s) in enumerate(zip(idx, seqs)):
            n = min(requests[i][1], len(s) - 1)
            targets = torch.tensor(s[len(s) - n :], device=device)
            positions = torch.arange(len(s) - n - 1, len(s) - 1, device=device)
            out[i] = float(logp[row, positions, targets].sum())
    return out


def evaluate_task(
    model,
    tokenizer,
    examples: list[Example],
    name: str = "task",
    batch_size: int = 16,
    progress: bool = True,
    dtype: torch.dtype | None = None,
) -> TaskResult:
    """acc and acc_norm of ``model`` on ``examples``."""
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    requests = [
        encode_pair(tokenizer, ex.context, _continuation(ex.context, choice), bos)
        for ex in examples
        for choice in ex.choices
    ]
    scores = continuation_logprobs(model, requests, batch_size, progress=progress, dtype=dtype)
    correct = correct_norm = 0
    pos = 0
    for ex in examples:
        s = scores[pos : pos + len(ex.choices)]
        pos += len(ex.choices)
        norm = [v / max(len(c), 1) for v, c in zip(s, ex.choices)]
        correct += int(max(range(len(s)), key=s.__getitem__) == ex.label)
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == ex.label)
    n = len(examples)
    return TaskResult(name, correct / n, correct_norm / n, n)
