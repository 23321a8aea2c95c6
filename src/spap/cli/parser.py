"""``spap``'s flags: the parser, spap's one-line error format, and flags -> PruneConfig (a
``--config`` file with the flags given on the command line overriding it)."""

from __future__ import annotations

import argparse
import json
import math
import typing
from collections.abc import Callable
from dataclasses import Field, fields
from pathlib import Path
from typing import Any, NoReturn

from ..config import OFFLOAD_MODES, PruneConfig, flag_fields
from ..errors import UsageError

_GROUPS = {
    "": "what to prune",
    "solver.": "method (constants: docs/hyperparameters.md)",
    "calibration.": "calibration",
    "runtime.": "where it runs",
    "experimental.": "experimental (study knobs that lost on the quality matrix; docs/studies)",
}


def _flag(path: str, f: Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _dest(flag: str) -> str:
    return flag.removeprefix("--").removeprefix("no-").replace("-", "_")


def _value_type(path: str, f: Field) -> Callable[[str], Any]:
    """argparse type of a config field: its annotation's (X or X | None), GiB sizes checked."""
    if path == "runtime.max_host_memory_gib":
        return _gib
    hint = typing.get_type_hints(_owner(path))[f.name]
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
    return kinds[0]


def _owner(path: str) -> type:
    section = path.partition(".")[0] if "." in path else ""
    return {f.name: f.default_factory for f in fields(PruneConfig)}.get(section, PruneConfig)  # type: ignore[return-value]


def config_flags() -> dict[str, tuple[str, ...]]:
    """argparse dest -> the PruneConfig fields (dotted paths) that flag sets."""
    by_dest: dict[str, tuple[str, ...]] = {}
    for path, f in flag_fields():
        dest = _dest(_flag(path, f))
        by_dest[dest] = (*by_dest.get(dest, ()), path)
    return by_dest


def _add_config_args(p: argparse.ArgumentParser) -> set[str]:
    """One option per PruneConfig field, in groups by section, generated from the fields' metadata
    (``spap.core.solver_config.option``); returns the flags that ``--help`` hides."""
    defaults = PruneConfig().to_dict()
    groups = {title: p.add_argument_group(title) for title in _GROUPS.values()}
    hidden: set[str] = set()
    seen: set[str] = set()
    for path, f in flag_fields():
        flag = _flag(path, f)
        if flag in seen:  # --seed sets two fields
            continue
        seen.add(flag)
        meta = f.metadata
        section = path.rpartition(".")[0] + "." if "." in path else ""
        experimental = meta.get("experimental") or section == "experimental."
        group = groups[_GROUPS["experimental." if experimental else section]]
        default = _get(defaults, path)
        if isinstance(default, bool):
            action = "store_false" if default else "store_true"
            group.add_argument(flag, dest=_dest(flag), action=action, default=default, help=meta["help"])
        else:
            shown = (
                ""
                if default is None or meta.get("choices")
                else f" (default {default:g})"
                if isinstance(default, float)
                else f" (default {default})"
            )
            group.add_argument(
                flag,
                dest=_dest(flag),
                type=_value_type(path, f),
                default=default,
                choices=meta.get("choices"),
                metavar=meta.get("metavar"),
                help=meta["help"] + shown,
            )
        if meta.get("expert") or experimental:
            hidden.add(flag)
    return hidden


class _Parser(argparse.ArgumentParser):
    """argparse with spap's error format: one line on stderr, exit status 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"spap: error: {message} (see {self.prog} --help)\n")


def _gib(text: str) -> float:
    """argparse type of a memory size in GiB: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number of GiB > 0, got {text!r}")
    return value


def build_parser(show_all: bool = True) -> argparse.ArgumentParser:
    parser = _Parser(prog="spap", description="Structured pruning of Hugging Face causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune MLP neurons and write a smaller checkpoint")
    p.add_argument(
        "model", nargs="?", default=None, help="checkpoint dir, .gguf file or hub id (default: embedded SmolLM2-135M)"
    )
    p.add_argument("--out", default=None, help="output directory (written atomically; required unless --dry-run)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the arguments, decide --offload and print the predicted peak host (and GPU) memory; load nothing",
    )
    p.add_argument(
        "--save-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of the written weights (auto: the input checkpoint's; bfloat16 for GGUF input)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--config", default=None, help="JSON file with a PruneConfig; flags given on the command line override it"
    )
    p.add_argument("--eval", action="store_true", help="perplexity before and after pruning")
    p.add_argument("--ppl", nargs="*", default=None, help="text files for --eval (default: bundled held-out text)")
    p.add_argument("--ppl-seq-len", type=int, default=2048, help="window length for --eval")
    p.add_argument(
        "--eval-dtype",
        default="auto",
        help="matmul dtype for evaluation (autocast; auto: bfloat16 where the device runs it fast (CUDA, AMX / AVX512-BF16 CPUs), else float32)",
    )
    p.add_argument(
        "--offload",
        default="auto",
        choices=OFFLOAD_MODES,
        help="stream one decoder layer at a time from the checkpoint's safetensors shards and write the output "
        "shard by shard (auto: when the model would not fit in --max-host-memory)",
    )
    p.add_argument(
        "--pad-to-uniform",
        action="store_true",
        help="zero-pad non-uniform widths to the maximum (stock-loadable everywhere)",
    )
    hidden = _add_config_args(p) | {"--ppl-seq-len", "--eval-dtype", "--pad-to-uniform"}
    p.add_argument("--help-all", action="help", help="show every option, solver constants included, and exit")
    if not show_all:
        for action in p._actions:
            if set(action.option_strings) & hidden:
                action.help = argparse.SUPPRESS

    e = sub.add_parser("eval", help="evaluate a (pruned) checkpoint")
    e.add_argument("model", nargs="?", default=None, help="checkpoint dir (default: embedded SmolLM2-135M)")
    e.add_argument("--ppl", nargs="*", default=None, help="text files (default: bundled held-out text)")
    e.add_argument("--seq-len", type=int, default=2048)
    e.add_argument(
        "--dtype",
        default="auto",
        help="matmul dtype (autocast; auto: bfloat16 where the device runs it fast (CUDA, AMX / AVX512-BF16 CPUs), else float32); float32 for exact",
    )
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument(
        "--score-from",
        type=int,
        default=0,
        metavar="K",
        help="score only predictions at window positions >= K (seq_len/2: llama.cpp's convention)",
    )
    e.add_argument("--tasks", nargs="*", default=None, help="zero-shot task files (BIG-bench .json or .jsonl)")
    e.add_argument("--limit", type=int, default=None, help="first N examples per task")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--harness", nargs="*", default=None, metavar="TASK", help="lm-evaluation-harness task names")
    e.add_argument("--device", default="auto")
    e.add_argument(
        "--offload",
        default="auto",
        choices=OFFLOAD_MODES,
        help="perplexity one decoder layer at a time from the safetensors shards "
        "(auto: when the float32 model would not fit in --max-host-memory)",
    )
    e.add_argument(
        "--max-host-memory",
        type=_gib,
        default=None,
        metavar="GIB",
        help="host-memory budget (default: 80%% of the memory available at start)",
    )
    b = sub.add_parser("bench", help="speed and memory: dense vs pruned, measured in one run")
    b.add_argument("dense", help="dense checkpoint dir (or 'smollm2')")
    b.add_argument("pruned", help="pruned checkpoint dir")
    b.add_argument("--device", default="auto")
    b.add_argument(
        "--dtype",
        default="auto",
        help="weights are cast to this dtype for the benchmark (auto: bfloat16 where the device runs it fast (CUDA, AMX / AVX512-BF16 CPUs), else float32)",
    )
    b.add_argument("--prefill-batch", type=int, default=4)
    b.add_argument("--prefill-len", type=int, default=512)
    b.add_argument("--decode-batch", type=int, default=16)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--out", default=None, help="write the comparison as JSON here")
    x = sub.add_parser("export", help="write a pruned checkpoint in a serving engine's format")
    x.add_argument("checkpoint", help="directory written by spap prune")
    x.add_argument(
        "--format",
        default="gguf",
        choices=["gguf", "decilm"],
        help="gguf: llama.cpp, through its own converter (per-layer shapes as its DeciLM architecture); decilm: DeciLM / "
        "Nemotron-NAS, per-layer MLP widths (multiples of 256) and KV groups, as vLLM and llama.cpp run it",
    )
    x.add_argument("--outtype", default="bf16", choices=["f32", "f16", "bf16", "q8_0", "auto"], help="GGUF only")
    x.add_argument("--out", default=None, help="output (default: CHECKPOINT/model-OUTTYPE.gguf, or CHECKPOINT-decilm/)")
    x.add_argument("--converter", default=None, help="llama.cpp's convert_hf_to_gguf.py (default: fetched once)")
    x.add_argument("--overwrite", action="store_true")
    pl = sub.add_parser("plot", help="PNG of per-layer kept widths and errors of a pruned checkpoint")
    pl.add_argument("checkpoint", help="directory written by spap prune")
    pl.add_argument("--out", default=None, help="PNG path (default: CHECKPOINT/layers.png)")
    return parser


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    """The run's PruneConfig: from the flags, or from ``--config FILE`` with the flags given on the
    command line (``args.explicit``) overriding the file's values."""
    try:
        given = _config_from_flags(args).to_dict()
    except (ValueError, TypeError) as exc:  # invalid values
        raise UsageError(str(exc)) from exc
    if not args.config:
        return PruneConfig.from_dict(given)
    file = Path(args.config)
    try:
        merged = PruneConfig.from_dict(json.loads(file.read_text())).to_dict()  # from_dict names a non-object
        by_dest = config_flags()
        for dest in getattr(args, "explicit", set()):
            for path in by_dest.get(dest, ()):
                _set(merged, path, _get(given, path))
        return PruneConfig.from_dict(merged)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--config {file}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise UsageError(f"--config {file}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--config {file}: {exc}") from None


def _get(tree: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        tree = tree[key]
    return tree


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    parent, _, key = path.rpartition(".")
    (_get(tree, parent) if parent else tree)[key] = value


def explicit_dests(argv: list[str]) -> set[str]:
    """argparse ``dest``s of the options given on the command line (not left at their defaults)."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for sub in [parser, *subparsers.choices.values()]:
        for action in sub._actions:
            if not isinstance(action, argparse._SubParsersAction):
                action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


def _config_from_flags(args: argparse.Namespace) -> PruneConfig:
    """PruneConfig of the parsed flags (every config field has one, see ``config_flags``)."""
    tree = PruneConfig().to_dict()
    for dest, paths in config_flags().items():
        for path in paths:
            _set(tree, path, getattr(args, dest))
    return PruneConfig.from_dict(tree)
