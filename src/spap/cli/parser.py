"""``spap``'s flags: the parser, spap's one-line error format, and flags -> PruneConfig (a
``--config`` file with the flags given on the command line overriding it)."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import fields
from pathlib import Path
from typing import NoReturn

from ..config import ALLOCATIONS, HEAD_UNITS, OFFLOAD_MODES, TOKEN_WEIGHTINGS, CalibrationConfig, PruneConfig
from ..core.allocation import CFSP_SLOPE
from ..core.solver_config import METHODS, REFITS, SELECTIONS, SolverConfig
from ..errors import UsageError

_SOLVER_HELP = {
    "penalty_rounds": "K, penalty-loop rounds",
    "rho_init": "rho_0 relative to mean diag(G)",
    "rho_growth": "tau, rho multiplier per round",
    "momentum": "alpha, soft-mask momentum",
    "score_exponent": "t, importance exponent",
    "ramp": "fraction of rounds over which the target count grows to k",
    "penalty_patience": "stop the penalty loop once the full-size mask is unchanged this many rounds (0: all rounds)",
    "damping": "ridge relative to mean diag(G)",
    "refit_rounds": "final alternating-minimisation rounds",
    "refit_grad_steps": "gradient steps on W_up/W_gate per round",
    "refit_tokens": "calibration tokens used by the refit",
    "refit_patience": "stop the refit after this many rounds without held-out improvement (0: all rounds)",
    "refit_holdout_tokens": "calibration tokens the refit's early stopping measures on",
    "refit_min_gain": "a round must lower the held-out error by this fraction to count as improving",
    "refit_proximal": "trust-region strength of the refit (0: off)",
    "refit_input_noise": "sigma: refit on inputs x + sigma rms(x) eps, dense targets there (0: off)",
}


def _add_solver_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("solver (defaults: see docs/hyperparameters.md)")
    g.add_argument("--method", default="spap", choices=METHODS)
    g.add_argument("--selection", default=None, choices=SELECTIONS, help="override the method's selection rule")
    g.add_argument("--refit", default=None, choices=REFITS, help="override the method's reconstruction")
    g.add_argument("--fit-bias", default="auto", choices=["auto", "yes", "no"])
    g.add_argument(
        "--no-refit-safeguard",
        dest="refit_safeguard",
        action="store_false",
        help="keep the refit even where it raises the objective on all calibration tokens",
    )
    defaults = SolverConfig()
    for name, text in _SOLVER_HELP.items():
        value = getattr(defaults, name)
        g.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, help=f"{text} (default {value})")


_EXPERT_FLAGS = {
    "--head-unit",
    "--temperature",
    "--angular-slope",
    "--min-sparsity",
    "--max-sparsity",
    "--pad-to-uniform",
    "--error-correction",
    "--token-weighting",
    "--batch-size",
    "--compute-dtype",
    "--ppl-seq-len",
    "--eval-dtype",
    "--selection",
    "--fit-bias",
    "--no-refit-safeguard",
    *("--" + name.replace("_", "-") for name in _SOLVER_HELP),
}
"""Flags listed by ``--help-all`` only: solver constants and research options."""


def _hide_expert_flags(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if set(action.option_strings) & _EXPERT_FLAGS:
            action.help = argparse.SUPPRESS


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
    p.add_argument("--sparsity", type=float, default=0.3, help="fraction of MLP neurons to remove, in [0, 1)")
    p.add_argument(
        "--drop-layers",
        type=int,
        default=0,
        metavar="N",
        help="also remove N whole decoder layers (those that change the hidden state least); stock checkpoint",
    )
    p.add_argument(
        "--target-ratio",
        type=float,
        default=None,
        metavar="R",
        help="remove this fraction of all parameters, split between whole layers, KV groups and MLP width by "
        "measuring each mix on held-out calibration windows (sets --sparsity, --drop-layers, head sparsity)",
    )
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument(
        "--save-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of the written weights (auto: the input checkpoint's; bfloat16 for GGUF input)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--target", default="mlp", choices=["mlp", "attn", "both"], help="prune MLP neurons, attention heads or both"
    )
    p.add_argument(
        "--head-sparsity",
        type=float,
        default=0.0,
        help="fraction of attention heads removed per layer, in units of --head-unit",
    )
    p.add_argument(
        "--head-unit",
        default="kv-group",
        choices=HEAD_UNITS,
        help="kv-group: whole KV groups with their query heads; query: the same number of query heads in every KV group",
    )
    p.add_argument(
        "--allocation",
        default="auto",
        choices=ALLOCATIONS,
        help="auto: global for flap, angular for cfsp, else uniform",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="structprune softmax temperature T")
    p.add_argument(
        "--angular-slope", type=float, default=CFSP_SLOPE, help=f"angular (CFSP) sigmoid slope (default {CFSP_SLOPE:g})"
    )
    p.add_argument("--min-sparsity", type=float, default=0.0, help="per-layer lower bound (non-uniform allocations)")
    p.add_argument("--max-sparsity", type=float, default=0.9, help="per-layer upper bound (non-uniform allocations)")
    p.add_argument("--width-multiple", type=int, default=1, help="round kept MLP widths to multiples of this")
    p.add_argument(
        "--pad-to-uniform",
        action="store_true",
        help="zero-pad non-uniform widths to the maximum (stock-loadable everywhere)",
    )
    p.add_argument("--error-correction", type=float, default=0.0, help="beta: also correct upstream error (0..1)")
    p.add_argument(
        "--token-weighting",
        default="none",
        choices=TOKEN_WEIGHTINGS,
        help="experimental; residual: weight each token's reconstruction error by 1/||h||^2 of the residual "
        "stream (better for SPAP at long context, breaks fasp; docs/hyperparameters.md)",
    )
    p.add_argument(
        "--calib",
        default="bundled",
        help="bundled | self | text FILE | token-id FILE.pt (e.g. calibration_ids.pt of a --calib self run) | hf:NAME[:CONFIG[:SPLIT]]",
    )
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--compute-dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--offload",
        default="auto",
        choices=OFFLOAD_MODES,
        help="stream one decoder layer at a time from the checkpoint's safetensors shards and write the output "
        "shard by shard (auto: when the model would not fit in --max-host-memory)",
    )
    p.add_argument(
        "--max-host-memory",
        type=_gib,
        default=None,
        metavar="GIB",
        help="host-memory budget; calibration activations over half of it go to disk "
        "(default: 80%% of the memory available at start)",
    )
    p.add_argument(
        "--config", default=None, help="JSON file with a PruneConfig; flags given on the command line override it"
    )
    p.add_argument("--eval", action="store_true", help="perplexity before and after pruning")
    p.add_argument("--ppl", nargs="*", default=None, help="text files for --eval (default: bundled held-out text)")
    p.add_argument("--ppl-seq-len", type=int, default=2048)
    p.add_argument("--eval-dtype", default="bfloat16", help="matmul dtype for evaluation (autocast)")
    _add_solver_args(p)
    p.add_argument("--help-all", action="help", help="show every option, solver constants included, and exit")
    if not show_all:
        _hide_expert_flags(p)

    e = sub.add_parser("eval", help="evaluate a (pruned) checkpoint")
    e.add_argument("model", nargs="?", default=None, help="checkpoint dir (default: embedded SmolLM2-135M)")
    e.add_argument("--ppl", nargs="*", default=None, help="text files (default: bundled held-out text)")
    e.add_argument("--seq-len", type=int, default=2048)
    e.add_argument("--dtype", default="bfloat16", help="matmul dtype (autocast); float32 for exact")
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
    b.add_argument("--dtype", default="bfloat16", help="weights are cast to this dtype for the benchmark")
    b.add_argument("--prefill-batch", type=int, default=4)
    b.add_argument("--prefill-len", type=int, default=512)
    b.add_argument("--decode-batch", type=int, default=16)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--out", default=None, help="write the comparison as JSON here")
    x = sub.add_parser("export", help="write a pruned checkpoint in a serving engine's format")
    x.add_argument("checkpoint", help="directory written by spap prune (stock shapes)")
    x.add_argument("--format", default="gguf", choices=["gguf"], help="gguf: llama.cpp, through its own converter")
    x.add_argument("--outtype", default="bf16", choices=["f32", "f16", "bf16", "q8_0", "auto"])
    x.add_argument("--out", default=None, help="output file (default: CHECKPOINT/model-OUTTYPE.gguf)")
    x.add_argument("--converter", default=None, help="llama.cpp's convert_hf_to_gguf.py (default: fetched once)")
    x.add_argument("--overwrite", action="store_true")
    pl = sub.add_parser("plot", help="PNG of per-layer kept widths and errors of a pruned checkpoint")
    pl.add_argument("checkpoint", help="directory written by spap prune")
    pl.add_argument("--out", default=None, help="PNG path (default: CHECKPOINT/layers.png)")
    return parser


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    """The run's PruneConfig: from the flags, or from ``--config FILE`` with the flags given on the
    command line overriding the file's values."""
    try:
        flags = _config_from_flags(args)
    except (ValueError, TypeError) as exc:  # invalid values
        raise UsageError(str(exc)) from exc
    if not args.config:
        return flags
    file = Path(args.config)
    try:
        merged = PruneConfig.from_dict(json.loads(file.read_text())).to_dict()  # from_dict names a non-object
        given = flags.to_dict()
        for dest in getattr(args, "explicit", set()):
            for path in _config_fields_of_flag(dest):
                parent, _, key = path.rpartition(".")
                (merged[parent] if parent else merged)[key] = (given[parent] if parent else given)[key]
        return PruneConfig.from_dict(merged)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--config {file}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise UsageError(f"--config {file}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--config {file}: {exc}") from None


_FLAG_FIELDS = {
    "calib": ("calibration.source",),
    "n_samples": ("calibration.n_samples",),
    "seq_len": ("calibration.seq_len",),
    "seed": ("seed", "calibration.seed"),
    "max_host_memory": ("max_host_memory_gib",),
}


def _config_fields_of_flag(dest: str) -> tuple[str, ...]:
    """The PruneConfig fields (dotted paths) that the flag with argparse ``dest`` sets; () for flags
    that are no part of the configuration (--out, --eval, ...)."""
    if dest in _FLAG_FIELDS:
        return _FLAG_FIELDS[dest]
    if dest in {f.name for f in fields(SolverConfig)}:
        return (f"solver.{dest}",)
    top = {f.name for f in fields(PruneConfig)} - {"solver", "calibration"}
    return (dest,) if dest in top else ()


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
    solver_kwargs = {f.name: getattr(args, f.name) for f in fields(SolverConfig) if hasattr(args, f.name)}
    return PruneConfig(
        sparsity=args.sparsity,
        drop_layers=args.drop_layers,
        target_ratio=args.target_ratio,
        target=args.target,
        head_sparsity=args.head_sparsity,
        head_unit=args.head_unit,
        solver=SolverConfig(**solver_kwargs),
        calibration=CalibrationConfig(args.calib, args.n_samples, args.seq_len, args.seed),
        allocation=args.allocation,
        temperature=args.temperature,
        angular_slope=args.angular_slope,
        min_sparsity=args.min_sparsity,
        max_sparsity=args.max_sparsity,
        width_multiple=args.width_multiple,
        error_correction=args.error_correction,
        token_weighting=args.token_weighting,
        device=args.device,
        compute_dtype=args.compute_dtype,
        batch_size=args.batch_size,
        seed=args.seed,
        max_host_memory_gib=args.max_host_memory,
    )
