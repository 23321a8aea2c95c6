"""Calibration and evaluation text: loading, tokenising into fixed-length windows."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..config import CalibrationConfig

log = logging.getLogger(__name__)

BUNDLED = "bundled"
HELDOUT_FRACTION = 0.15  # tail of the bundled text kept out of calibration for held-out perplexity


def bundled_text(part: str = "calibration") -> str:
    """Natsume Soseki's "Botchan" (public domain, Project Gutenberg #8868) shipped with spap.

    part: "calibration" (first 85% of lines) or "heldout" (last 15%).
    """
    if part not in ("calibration", "heldout"):
        raise ValueError("part must be 'calibration' or 'heldout'")
    raw = resources.files("spap").joinpath("data/botchan.txt").read_text(encoding="utf-8-sig")
    start = raw.find("*** START OF")
    end = raw.find("End of Project Gutenberg")
    body = raw[raw.find("\n", start) + 1 : end if end > 0 else None]
    lines = [line for line in body.splitlines() if line.strip()]
    cut = int(len(lines) * (1 - HELDOUT_FRACTION))
    return "\n".join(lines[:cut] if part == "calibration" else lines[cut:])


def read_text_file(path: str | Path) -> str:
    """Text of ``path``; WikiText raw files (wiki.*.raw) get the usual "\\n\\n".join(lines) layout."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; pass a text file")
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); pass a text file, or a .pt file of token ids"
        ) from None
    if not text.strip():
        raise ValueError(f"{path} holds no text (empty or whitespace only); pass a file with text in it")
    if re.fullmatch(r"wiki\..*\.raw", path.name):
        return "\n\n".join(line.strip("\r") for line in text.splitlines() if line.strip())
    return text


def load_text(source: str) -> str:
    """Text for ``source``: "bundled", "bundled-heldout", "hf:NAME[:CONFIG[:SPLIT]]" or a file path."""
    if source == BUNDLED:
        return bundled_text("calibration")
    if source == "bundled-heldout":
        return bundled_text("heldout")
    if source.startswith("hf:"):
        return _hf_dataset_text(source[3:])
    return read_text_file(source)


def _hf_dataset_text(spec: str) -> str:
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise RuntimeError("hf: calibration sources need the 'datasets' package: pip install 'spap[data]'") from exc
    try:
        ds = datasets.load_dataset(name, config, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - network / hub errors vary
        raise RuntimeError(
            f"could not load dataset {spec!r} from the Hugging Face hub ({exc}); offline, pass a local text file "
            "or --calib self"
        ) from exc
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(t for t in ds[column] if t)


def tokenize(tokenizer, text: str) -> Tensor:
    """1-D token ids of ``text`` (including the tokenizer's own BOS, if it adds one)."""
    return torch.tensor(tokenizer(text, return_attention_mask=False)["input_ids"], dtype=torch.long)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer prepends a BOS token when encoding."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", return_attention_mask=False)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def sample_windows(ids: Tensor, n_samples: int, seq_len: int, seed: int, bos_id: int | None = None) -> Tensor:
    """``n_samples`` disjoint random windows (n, seq_len) of ``ids``; fewer (with a warning) if text is short.

    If ``bos_id`` is given every window starts with it (seq_len - 1 text tokens follow).
    """
    if bos_id is not None and ids.numel() and ids[0] == bos_id:
        ids = ids[1:]
    body = seq_len - (bos_id is not None)
    if ids.numel() < body:
        log.warning("calibration text has only %d tokens; using one window of that length", ids.numel())
        body, seq_len = ids.numel(), ids.numel() + (bos_id is not None)
    if body <= 0:
        raise ValueError("calibration text is empty")
    slots = ids.numel() // body
    if slots < n_samples:
        log.warning(
            "calibration text has %d tokens: only %d windows of %d tokens fit (asked for %d); using %d",
            ids.numel(),
            slots,
            seq_len,
            n_samples,
            slots,
        )
        n_samples = slots
    gen = torch.Generator().manual_seed(seed)
    offset = int(torch.randint(0, ids.numel() - slots * body + 1, (1,), generator=gen))
    chosen = torch.randperm(slots, generator=gen)[:n_samples].sort().values
    rows = torch.stack([ids[offset + int(i) * body : offset + (int(i) + 1) * body] for i in chosen])
    if bos_id is not None:
        rows = torch.cat([torch.full((rows.shape[0], 1), bos_id, dtype=torch.long), rows], dim=1)
    return rows


TOKEN_FILE_SUFFIX = ".pt"
CALIBRATION_FILE = "calibration_ids.pt"  # written next to a checkpoint pruned with --calib self


def load_token_file(path: str | Path, n_samples: int, seq_len: int) -> Tensor:
    """Token ids (n, seq_len) from a ``torch.save``d 2-D integer tensor, e.g. the calibration_ids.pt a
    ``--calib self`` run wrote: the first ``n_samples`` rows, cut to ``seq_len`` columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration token file not found: {path}")
    ids = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.numel() == 0:
        raise ValueError(f"{path} must hold a non-empty 2-D integer tensor of token ids (n, seq_len)")
    if ids.shape[0] < n_samples or ids.shape[1] < seq_len:
        log.warning(
            "%s holds %d x %d tokens (asked for %d x %d); using %d x %d",
            path,
            *ids.shape,
            n_samples,
            seq_len,
            min(n_samples, ids.shape[0]),
            min(seq_len, ids.shape[1]),
        )
    return ids[:n_samples, :seq_len].long()


def check_calibration_source(source: str) -> None:
    """Raise now (OSError / ValueError) if ``source`` names a text file that cannot be read as
    ``calibration_tokens`` would read it; other sources are checked where they are loaded."""
    if source == "self" or source.endswith(TOKEN_FILE_SUFFIX) or source in (BUNDLED, "bundled-heldout"):
        return
    if not source.startswith("hf:"):
        read_text_file(source)


def calibration_tokens(
    tokenizer, cfg: CalibrationConfig, model=None, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> Tensor:
    """Calibration batch (n, seq_len) of token ids described by ``cfg``.

    ``dtype``: matmul dtype (autocast) and ``device``: where the model runs for self-generation."""
    if cfg.source == "self":
        if model is None:
            raise ValueError("calibration source 'self' needs the model")
        return self_generated(model, tokenizer, cfg.n_samples, cfg.seq_len, cfg.seed, dtype=dtype, device=device)
    if cfg.source.endswith(TOKEN_FILE_SUFFIX):
        return load_token_file(cfg.source, cfg.n_samples, cfg.seq_len)
    ids = tokenize(tokenizer, load_text(cfg.source))
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    return sample_windows(ids, cfg.n_samples, cfg.seq_len, cfg.seed, bos)


@contextmanager
def weights_as(model, device: torch.device | None, dtype: torch.dtype | None) -> Iterator[torch.device]:
    """Run ``model`` on a copy of its weights on ``device``, floating parameters cast to ``dtype``.

    Each parameter's and buffer's storage is swapped for its copy and the original tensor is put back
    afterwards, so the weights come back bit for bit (no round trip through ``dtype``) and the host
    holds no second full-precision copy.  Buffers keep their dtype (e.g. rotary frequencies).  If the copy
    does not fit on ``device`` (CUDA out of memory), it is made where the model is, with a warning.
    Yields the device the model runs on."""
    home = next(model.parameters()).device
    target = home if device is None else torch.device(device)
    try:
        swap = _swap_storage(model, target, dtype)
    except torch.cuda.OutOfMemoryError:
        if target == home:
            raise
        torch.cuda.empty_cache()
        log.warning("model does not fit on %s for self-generation; generating on %s (slow)", target, home)
        target, swap = home, _swap_storage(model, home, dtype)
    try:
        yield target
    finally:
        _restore_storage(swap)


def _swap_storage(model, device: torch.device, dtype: torch.dtype | None) -> list[tuple[Tensor, Tensor]]:
    """Point every parameter and buffer at a copy on ``device`` (parameters in ``dtype``); the originals."""
    originals: list[tuple[Tensor, Tensor]] = []
    try:
        for t in [*model.parameters(), *model.buffers()]:
            is_weight = isinstance(t, torch.nn.Parameter) and t.is_floating_point()
            cast = dtype if dtype is not None and is_weight else t.dtype
            if t.device != device or t.dtype != cast:
                originals.append((t, t.data))
                t.data = t.data.to(device=device, dtype=cast)
    except BaseException:
        _restore_storage(originals)
        raise
    return originals


def _restore_storage(originals: list[tuple[Tensor, Tensor]]) -> None:
    for t, data in originals:
        t.data = data


@torch.no_grad()
def self_generated(
    model,
    tokenizer,
    n_samples: int,
    seq_len: int,
    seed: int,
    batch_size: int = 32,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Sequences sampled from the dense model itself (temperature 1), starting from BOS (or EOS).

    With ``dtype`` (e.g. the pipeline's compute dtype) and ``device``, generation runs on a copy of the
    weights cast to ``dtype`` on ``device`` (``weights_as``; the model's own weights are untouched).
    The KV cache is static (allocated once for seq_len tokens).  Both for speed: on a 2-core CPU this
    sampled 1.98x to 2.25x as fast as autocast (which re-casts every weight at every step) with the growing
    cache (benchmarks/studies/generation_speed.py)."""
    start = start_token(tokenizer)
    torch.manual_seed(seed)
    with weights_as(model, device, dtype) as where:
        return sample_sequences(model, start, n_samples, seq_len, batch_size, where)


def start_token(tokenizer) -> int:
    """The token every sampled sequence starts from: BOS, else EOS."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("tokenizer has neither BOS nor EOS token to start generation from")
    return start


class _GenerationProgress:
    """A ``generate`` streamer that only counts: the progress bar advances by the batch size for every
    generated token column (``generate`` hands the prompt over first; it is not counted)."""

    def __init__(self, bar) -> None:
        self.bar = bar
        self.prompt_seen = False

    def put(self, value: Tensor) -> None:
        if self.prompt_seen:
            self.bar.update(value.shape[0])
        self.prompt_seen = True

    def end(self) -> None:
        self.prompt_seen = False  # the next batch starts with its prompt


def sample_sequences(
    model,
    start: int,
    n_samples: int,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    cache_implementation: str | None = "static",
) -> Tensor:
    """(n_samples, seq_len) ids sampled at temperature 1 from ``start``, ``batch_size`` at a time, with
    the model as it is (no cast); ``cache_implementation=None`` is transformers' growing cache."""
    out = []
    with tqdm(total=n_samples * (seq_len - 1), desc="self-generating calibration", unit="tok") as bar:
        progress = _GenerationProgress(bar)
        for first in range(0, n_samples, batch_size):
            b = min(batch_size, n_samples - first)
            prompt = torch.full((b, 1), start, dtype=torch.long, device=device)
            seqs = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=seq_len - 1,
                min_new_tokens=seq_len - 1,
                pad_token_id=start,
                streamer=progress,
                cache_implementation=cache_implementation,
                disable_compile=True,
            )
            out.append(seqs[:, :seq_len].cpu())
    return torch.cat(out)
