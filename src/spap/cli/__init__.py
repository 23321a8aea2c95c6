"""Command-line interface: ``spap prune``, ``spap eval`` (thin wrappers over the Python API)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .parser import build_parser, config_from_args, explicit_dests

log = logging.getLogger("spap")


def cmd_prune(args: argparse.Namespace) -> int:
    from ..api import plan_checkpoint, prune_checkpoint
    from ..pruning import distributed
    from ..runtime.device import resolve_device
    from .summary import format_summary, quick_speed

    cfg = config_from_args(args)
    if args.dry_run:
        print(plan_checkpoint(args.model, cfg, offload=args.offload).line())
        return 0
    if args.out is None:
        raise UsageError("--out DIR is required (or pass --dry-run)")
    result = prune_checkpoint(
        args.model,
        args.out,
        cfg,
        offload=args.offload,
        save_dtype=args.save_dtype,
        overwrite=args.overwrite,
        pad_to_uniform=args.pad_to_uniform,
        ppl=(args.ppl or []) if args.eval else None,
        ppl_seq_len=args.ppl_seq_len,
        eval_dtype=args.eval_dtype,
        record={"command": args.command_line},  # how to reproduce the run
        echo=print,
    )
    if distributed.rank() != 0:  # data-parallel workers: rank 0 wrote the checkpoint
        return 0
    cpu = resolve_device(result.record["config"]["runtime"]["device"]).type == "cpu"
    speed = quick_speed(result.source, result.out, "cpu") if result.metrics and cpu else None
    summary = {**result.record, "seconds": result.report.seconds}
    print(format_summary(result.out, summary, result.metrics, speed, result.stock))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..api import check_positions
    from ..evaluation.perplexity import check_score_from
    from ..evaluation.texts import check_texts, perplexities
    from ..evaluation.zeroshot import evaluate_task, load_task
    from ..io.models import load_model, resolve_model
    from ..runtime.device import resolve_device, resolve_dtype

    try:  # bad arguments fail before the model loads
        check_score_from(args.score_from, args.seq_len)
        tasks = [load_task(t, args.limit) for t in args.tasks or []]
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from exc
    sources = check_texts(args.ppl) if args.ppl is not None or not (tasks or args.harness) else []
    if sources:
        check_positions(resolve_model(args.model), {"--seq-len": args.seq_len})
    if _eval_offloaded(args, bool(tasks or args.harness)):
        from transformers import AutoTokenizer

        path = args.resolved_model
        print(f"{path} (streamed: one decoder layer in memory at a time):")
        tokenizer = AutoTokenizer.from_pretrained(path)
        options: dict[str, Any] = dict(streamed_from=path, device=args.device, echo=print)
        ppl = perplexities(
            None, tokenizer, sources, args.seq_len, args.dtype, args.max_windows, args.score_from, **options
        )
        _merge_json(Path(path) / "eval.json", {"perplexity": ppl})
        return 0
    model, tokenizer, path = load_model(args.model, device=str(resolve_device(args.device)))
    print(f"{path}:")
    results: dict[str, Any] = {}
    if sources:
        results["perplexity"] = perplexities(
            model, tokenizer, sources, args.seq_len, args.dtype, args.max_windows, args.score_from, echo=print
        )
    if tasks:
        dtype = resolve_dtype(args.dtype, next(model.parameters()).device)
        results["zeroshot"] = {}
        for name, examples in tasks:
            r = evaluate_task(model, tokenizer, examples, name, args.batch_size, dtype=dtype)
            results["zeroshot"][name] = r.to_dict()
        print(f"  {'task':24s} {'n':>6s} {'acc':>7s} {'acc_norm':>9s}")
        for r in results["zeroshot"].values():
            print(f"  {r['task']:24s} {r['n']:6d} {r['acc']:7.4f} {r['acc_norm']:9.4f}")
    if args.harness:
        from ..evaluation.harness import run_harness

        results["harness"] = run_harness(model, tokenizer, args.harness, args.batch_size, args.limit)
        print(json.dumps(results["harness"], indent=2))
    if Path(path).is_dir():
        _merge_json(Path(path) / "eval.json", results)
    return 0


def _eval_offloaded(args: argparse.Namespace, whole_model_tasks: bool) -> bool:
    """Decide ``spap eval --offload``: stream the perplexity when the float32 weights exceed the budget."""
    from ..io.models import resolve_model
    from ..runtime.memory import choose_offload, default_host_budget_gib

    if args.offload == "never":
        return False
    args.resolved_model = resolve_model(args.model)
    budget = args.max_host_memory or default_host_budget_gib()
    offload, why = choose_offload(args.offload, args.resolved_model, budget)
    log.info("%s: %s", "streamed" if offload else "in memory", why)
    if offload and whole_model_tasks:
        raise UsageError(f"--tasks and --harness hold the whole model ({why}): pass --offload never")
    return offload


def cmd_bench(args: argparse.Namespace) -> int:
    from ..evaluation.speed import compare, format_comparison
    from ..io.models import load_model
    from ..runtime.device import dtype_name, resolve_device

    device = str(resolve_device(args.device))
    dtype = dtype_name(args.dtype, device)
    dense, _, dense_path = load_model(args.dense, dtype=dtype, device=device)
    pruned, _, pruned_path = load_model(args.pruned, dtype=dtype, device=device)
    result = compare(
        dense,
        pruned,
        prefill_batch=args.prefill_batch,
        prefill_len=args.prefill_len,
        decode_batch=args.decode_batch,
        new_tokens=args.new_tokens,
    )
    result.update(dense_model=dense_path, pruned_model=pruned_path, device=device, dtype=dtype)
    print(f"{dense_path} vs {pruned_path} on {device} ({dtype}):")
    print(format_comparison(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..io.checkpoint import REMOTE_CODE_FILE
    from ..io.llamacpp import export_gguf

    if args.format == "decilm":
        from ..io.decilm import export_decilm

        source = Path(args.checkpoint)
        out_dir = Path(args.out) if args.out else source.with_name(f"{source.name}-decilm")
        written_dir = export_decilm(source, out_dir, args.overwrite)
        print(f"wrote {written_dir} (DeciLMForCausalLM); vLLM: vllm serve {written_dir} --trust-remote-code")
        return 0
    out = Path(args.out) if args.out else Path(args.checkpoint) / f"model-{args.outtype}.gguf"
    written = export_gguf(args.checkpoint, out, args.outtype, args.converter, args.overwrite)
    shapes = " (per-layer shapes, as DeciLM)" if (Path(args.checkpoint) / REMOTE_CODE_FILE).exists() else ""
    print(f"wrote {written} ({written.stat().st_size / 2**20:.0f} MiB){shapes}; llama.cpp: llama-cli -m {written}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plotting import plot_layers

    print(f"wrote {plot_layers(args.checkpoint, args.out)}")
    return 0


def _merge_json(file: Path, update: dict[str, Any]) -> None:
    """Merge ``update`` into a JSON file (atomic replace)."""
    data = json.loads(file.read_text()) if file.is_file() else {}
    for key, value in update.items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
    data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    tmp = file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, file)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that temporary output is removed on the way out."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def _close_progress_bars() -> None:
    """Close the progress bars an error interrupted, so the error starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _describe(exc: BaseException) -> str:
    """One line naming the problem and, where spap knows it, what to do."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        if exc.filename is None and exc.strerror and exc.strerror != os.strerror(errno.ENOSPC):
            return exc.strerror  # spap's own account of where and what to do
        return f"no space left on the device ({exc.filename or 'output'}); free space or choose another --out"
    if type(exc).__name__ == "SafetensorError":
        if "while serializing" in str(exc):  # a write: "Error while serializing: I/O error: No space left on device"
            full = "os error 28" in str(exc) or "No space left" in str(exc)
            problem = "no space left on the device" if full else "cannot write a safetensors file"
            return f"{problem} ({exc}); free space or choose another --out"
        return f"cannot read a safetensors file ({exc}); the checkpoint is truncated or corrupt: copy it again"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    known = (ValueError, OSError, RuntimeError, UsageError)
    return text if isinstance(exc, known) else f"{type(exc).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 success, 2 bad arguments or input paths, 1 runtime failure, 130/143 interrupted
    (SIGINT/SIGTERM).  Errors print one line on stderr (the traceback with --debug); an unfinished
    output directory is removed in every case."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(show_all="--help-all" in argv).parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2, one line already printed)
        return exc.code if isinstance(exc.code, int) else 2
    args.command_line = shlex.join(["spap", *argv])
    args.explicit = explicit_dests(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return {"prune": cmd_prune, "eval": cmd_eval, "bench": cmd_bench, "export": cmd_export, "plot": cmd_plot}[
            args.command
        ](args)
    except (KeyboardInterrupt, _Terminated) as exc:
        print("spap: interrupted; nothing was written", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        usage = isinstance(exc, (UsageError, FileNotFoundError, FileExistsError, NotADirectoryError))
        _close_progress_bars()
        hint = "" if args.debug or usage else " (--debug shows the traceback)"
        print(f"spap: error: {_describe(exc)}{hint}", file=sys.stderr)
        return 2 if usage else 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
