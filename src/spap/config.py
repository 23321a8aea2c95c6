"""Run configuration: dataclasses that round-trip to JSON, split by concern.

``PruneConfig`` holds what to prune (top-level fields) and four sections: ``solver`` (the method,
``spap.core.solver_config``), ``calibration`` (which tokens), ``runtime`` (where and how it runs) and
``experimental`` (study knobs that lost on the matrix, kept for the studies that cite them).  Every
field's ``metadata`` carries its command-line flag and help, from which ``spap.cli.parser`` builds
``spap prune``'s options: a field added here is a flag there.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any

from .core.allocation import CFSP_SLOPE
from .core.methods import get_method
from .core.solver_config import SolverConfig, option

ALLOCATIONS = ("auto", "uniform", "structprune", "global", "angular", "search")
TARGETS = ("mlp", "attn", "both")
HEAD_UNITS = ("kv-group", "query")
TOKEN_WEIGHTINGS = ("none", "residual")
OFFLOAD_MODES = ("auto", "never", "always")
AUTO_WIDTH_MULTIPLE = 64
"""Kept MLP widths are rounded to this by default: at 30% of SmolLM2's neurons llama.cpp prefilled a
width of 1075 at 0.70x the dense model's speed and 1088 at 1.18x (results/llamacpp.json); GPUs lose
their tensor-core paths on odd widths the same way."""
AUTO_MIN_WIDTH = 1024
"""MLPs narrower than this keep exact sparsities by default (a multiple of 64 would move them > 3%)."""
CONFIG_VERSION = 4
"""Version of PruneConfig's JSON form: 1 (no "version" key) lacks drop_layers and target_ratio; 1 and
2 hold the runtime and experimental fields at the top level; 1-3 lack depth_repair (they ran without)."""

_MOVED_IN_V3 = {
    "device": "runtime",
    "compute_dtype": "runtime",
    "batch_size": "runtime",
    "max_host_memory_gib": "runtime",
    "error_correction": "experimental",
    "token_weighting": "experimental",
}


@dataclass
class CalibrationConfig:
    """Where calibration tokens come from.

    source: "bundled" (public-domain text shipped with spap), a path to a text file, a path to a
            ``.pt`` file of token ids (n, seq_len) such as the calibration_ids.pt a "self" run saves,
            "hf:NAME[:CONFIG[:SPLIT]]" (a Hugging Face dataset, needs network and ``datasets``),
            or "self" (text sampled from the dense model; fully offline).
    """

    source: str = option(
        "bundled",
        "bundled | self | text FILE | token-id FILE.pt (e.g. calibration_ids.pt of a --calib self run) | "
        "hf:NAME[:CONFIG[:SPLIT]]",
        flag="--calib",
    )
    n_samples: int = option(128, "calibration sequences")
    seq_len: int = option(2048, "tokens per calibration sequence")
    seed: int = option(0, "random seed (calibration sampling and every random draw)", flag="--seed")

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"n_samples (--n-samples) must be >= 1, got {self.n_samples}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len (--seq-len) must be >= 2 tokens, got {self.seq_len}")


@dataclass
class RuntimeConfig:
    """Where and how a run executes; none of it changes which neurons are removed (up to rounding).

    device:         "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    compute_dtype:  dtype of layer forwards during calibration: "auto" (bfloat16 where the
                    hardware runs it fast, else float32), "float32", "bfloat16", "float16".
                    Statistics and solves are always float32/float64.
    batch_size:     calibration sequences per forward.
    max_host_memory_gib: host-memory budget (GiB); calibration activations (3 x n x seq_len x hidden
                    in the compute dtype) over half of it are spilled to per-batch files in $TMPDIR
                    (``spap.runtime.spill``), and the offload decision uses it.  None: no limit.
    """

    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    compute_dtype: str = option(
        "auto", "dtype of calibration forwards: auto | float32 | bfloat16 | float16", expert=True
    )
    batch_size: int = option(8, "calibration sequences per forward", expert=True)
    max_host_memory_gib: float | None = option(
        None,
        "host-memory budget; calibration activations over half of it go to disk "
        "(default: 80%% of the memory available at start)",
        flag="--max-host-memory",
        metavar="GIB",
    )

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.max_host_memory_gib is not None and not 0 < self.max_host_memory_gib < math.inf:
            raise ValueError(f"max_host_memory_gib (--max-host-memory) must be > 0, got {self.max_host_memory_gib}")


@dataclass
class ExperimentalConfig:
    """Study knobs that lost on the quality matrix (docs/studies, docs/hyperparameters.md).

    error_correction: beta in [0, 1]: MLP targets become dense(x) + beta * (dense model's layer
                    output - pruned model's layer output with the dense MLP), so each layer also
                    corrects error accumulated upstream (0 = plain layer-wise reconstruction).
    token_weighting: "none" or "residual" (token n weighted by 1 / mean(h_n^2) of the layer's output
                    residual stream h_n); applies to every method's statistics and refit.
    """

    error_correction: float = option(0.0, "beta: also correct upstream error (0..1)")
    token_weighting: str = option(
        "none", "residual: weight each token's error by 1/||h||^2 of the residual stream", choices=TOKEN_WEIGHTINGS
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_correction <= 1.0:
            raise ValueError("error_correction must be in [0, 1]")
        if self.token_weighting not in TOKEN_WEIGHTINGS:
            raise ValueError(
                f"unknown token_weighting {self.token_weighting!r}; choose one of {', '.join(TOKEN_WEIGHTINGS)}"
            )


@dataclass
class PruneConfig:
    """Everything that determines a pruning run: what to prune, and the sections below.

    sparsity:       fraction of MLP neurons removed, in [0, 1).
    drop_layers:    number of whole decoder layers removed first (those whose output differs least
                    from their input on the calibration data, see ``spap.pruning.depth``).
    depth_repair:   refit the MLP of the layer before each removed run of layers so that its output
                    also carries what the removed layers added (closed-form least squares).
    target_ratio:   fraction of all parameters to remove, split between whole layers, KV groups and
                    MLP width by measurement (``spap.pruning.budget``); when set, it chooses
                    ``sparsity``, ``drop_layers`` and the head sparsity.
    target:         what is pruned: "mlp" neurons, "attn" heads (KV groups), or "both".
    head_sparsity:  fraction of attention heads removed per layer for "attn"/"both", in units of
                    ``head_unit``.
    head_unit:      "kv-group": remove round(head_sparsity * n_kv) whole KV groups (their k/v heads
                    and all query heads sharing them; shrinks the KV cache).  "query": remove
                    round(head_sparsity * q_per_kv) query heads from every KV group, keeping every
                    k/v head (finer steps on GQA models; the KV cache is unchanged).
    allocation:     how the neuron budget is split across layers: "auto" ("global" for method
                    "flap", "angular" for "cfsp", else "uniform"), "uniform" (same sparsity in every
                    layer), "structprune" (energy softmax, see spap.core.allocation), "global"
                    (FLAP's standardised global ranking), "angular" (CFSP's sigmoid of each block's
                    angular distance) or "search" (each of uniform, global and angular pruned with
                    the closed-form recipe, the one with the lowest loss on held-out calibration
                    windows kept; ``pruning.allocation_search``).
    temperature:    T of the structprune softmax (dimensionless: energies are normalised to mean 1).
    angular_slope:  slope of the "angular" allocation's sigmoid on per-token mean angular distances
                    (default: CFSP's a = 1 at its 128 x 2048 calibration tokens, see spap.core.allocation).
    min_sparsity, max_sparsity: per-layer bounds for non-uniform allocations.
    width_multiple: round every kept MLP width to a multiple of this (e.g. 64 or 256, for
                    efficient GEMM tiles). None: ``AUTO_WIDTH_MULTIPLE`` where every MLP is at least
                    ``AUTO_MIN_WIDTH`` wide, else 1 (``target_ratio`` too: a size met to the neuron
                    at width 758 prefilled at 0.83x the dense speed in llama.cpp, see budget.py).
                    Uniform allocation: each layer's kept width is rounded to the nearest
                    multiple, so all layers keep one width (stock-loadable); the sparsity moves by
                    up to half a multiple per layer.  Non-uniform allocations: the model's total
                    stays within half a multiple of the budget.
    seed:           random seed of the pruning itself (refit samples); ``--seed`` also sets the
                    calibration's.
    """

    sparsity: float = option(0.3, "fraction of MLP neurons to remove, in [0, 1)")
    drop_layers: int = option(
        0,
        "also remove N whole decoder layers (those that change the hidden state least); stock checkpoint",
        metavar="N",
    )
    depth_repair: bool = option(
        True,
        "do not refit the layer before each removed run of layers to what the removed layers added",
        flag="--no-depth-repair",
        expert=True,
    )
    target_ratio: float | None = option(
        None,
        "remove this fraction of all parameters, split between whole layers, KV groups and MLP width by "
        "measuring each mix on held-out calibration windows (sets --sparsity, --drop-layers, head sparsity)",
        metavar="R",
    )
    target: str = option("mlp", "prune MLP neurons, attention heads or both", choices=TARGETS)
    head_sparsity: float = option(0.0, "fraction of attention heads removed per layer, in units of --head-unit")
    head_unit: str = option(
        "kv-group",
        "kv-group: whole KV groups with their query heads; query: the same number of query heads in every KV group",
        choices=HEAD_UNITS,
        expert=True,
    )
    allocation: str = option(
        "auto",
        "auto: global for flap, angular for cfsp, else uniform; search: the rule with the lowest held-out loss",
        choices=ALLOCATIONS,
    )
    temperature: float = option(1.0, "structprune softmax temperature T", expert=True)
    angular_slope: float = option(CFSP_SLOPE, "angular (CFSP) sigmoid slope", expert=True)
    min_sparsity: float = option(0.0, "per-layer lower bound (non-uniform allocations)", expert=True)
    max_sparsity: float = option(0.9, "per-layer upper bound (non-uniform allocations)", expert=True)
    width_multiple: int | None = option(
        None,
        f"round kept MLP widths to multiples of this (default: {AUTO_WIDTH_MULTIPLE} for MLPs at least "
        f"{AUTO_MIN_WIDTH} wide, exact sparsity for smaller MLPs)",
    )
    seed: int = option(0, "random seed (calibration sampling and every random draw)", flag="--seed")
    solver: SolverConfig = field(default_factory=SolverConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    experimental: ExperimentalConfig = field(default_factory=ExperimentalConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        if not isinstance(self.drop_layers, int) or self.drop_layers < 0:
            raise ValueError(f"drop_layers must be an integer >= 0, got {self.drop_layers!r}")
        if self.width_multiple is not None and (not isinstance(self.width_multiple, int) or self.width_multiple < 1):
            raise ValueError(f"width_multiple must be an integer >= 1, got {self.width_multiple!r}")
        if self.target_ratio is not None and not 0.0 < self.target_ratio < 1.0:
            raise ValueError(f"target_ratio must be in (0, 1), got {self.target_ratio!r}")
        if not 0.0 <= self.head_sparsity < 1.0:
            raise ValueError(f"head_sparsity must be in [0, 1), got {self.head_sparsity!r}")
        if self.head_unit not in HEAD_UNITS:
            raise ValueError(f"unknown head_unit {self.head_unit!r}; choose one of {', '.join(HEAD_UNITS)}")
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.allocation == "search" and self.target_ratio is not None:
            raise ValueError(
                "allocation 'search' with target_ratio: the budget search compares its mixes at uniform widths; "
                "pass one allocation rule (e.g. global)"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.angular_slope <= 0:
            raise ValueError(f"angular_slope must be > 0, got {self.angular_slope!r}")

    @property
    def prunes_mlp(self) -> bool:
        return self.target in ("mlp", "both")

    @property
    def prunes_heads(self) -> bool:
        return self.target in ("attn", "both") and self.head_sparsity > 0

    @property
    def allocation_rule(self) -> str:
        if self.allocation == "auto":
            return get_method(self.solver.method).allocation
        return self.allocation

    def width_multiple_for(self, widths: list[int]) -> int:
        """The multiple kept MLP widths are rounded to, for a model with MLP ``widths``."""
        if self.width_multiple is not None:
            return self.width_multiple
        exact = not widths or min(widths) < AUTO_MIN_WIDTH
        return 1 if exact else AUTO_WIDTH_MULTIPLE

    def to_dict(self) -> dict[str, Any]:
        return {"version": CONFIG_VERSION, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneConfig:
        """The config of ``data`` (``to_dict``'s form, any version up to ``CONFIG_VERSION``)."""
        version = 1
        if isinstance(data, dict) and "version" in data:
            data = dict(data)
            version = data.pop("version")
            if not isinstance(version, int) or not 1 <= version <= CONFIG_VERSION:
                raise ValueError(f"config version {version!r} is not one this spap reads (1..{CONFIG_VERSION})")
        if isinstance(data, dict) and version < 3:
            data = _sections_of_v2(data)
        if isinstance(data, dict) and version < 4:
            data = {"depth_repair": False, **data}
        return _from_dict(cls, data)

    @classmethod
    def from_json(cls, text: str) -> PruneConfig:
        return cls.from_dict(json.loads(text))


def _sections_of_v2(data: dict[str, Any]) -> dict[str, Any]:
    """A version 1 or 2 dict (runtime and experimental fields at the top level) in version 3's form."""
    data = dict(data)
    for name, section in _MOVED_IN_V3.items():
        if name in data:
            data.setdefault(section, {})[name] = data.pop(name)
    return data


def flag_fields(cls: type = PruneConfig, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, dataclass field) of every leaf field of ``cls``, sections depth-first."""
    leaves: list[tuple[str, Any]] = []
    for f in fields(cls):
        if f.default_factory is not MISSING and is_dataclass(f.default_factory):
            leaves += flag_fields(f.default_factory, f"{prefix}{f.name}.")
        else:
            leaves.append((prefix + f.name, f))
    return leaves


def _from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """``cls(**data)`` with nested dataclasses built from dicts; every value's JSON type checked
    against the field's annotation, the field named in the error (``where``: its parent's path)."""
    if not isinstance(data, dict):
        what = f"field {where.rstrip('.')}" if where else "file"
        raise ValueError(f"config {what} must be a JSON object of {cls.__name__} fields, got {json.dumps(data)}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(sorted(unknown))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        factory: Any = known[name].default_factory
        default = factory() if callable(factory) else None
        if is_dataclass(default):
            value = _from_dict(type(default), value, f"{where}{name}.")
        else:
            _check_type(f"{where}{name}", value, hints[name])
        kwargs[name] = value
    return cls(**kwargs)


_JSON_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


def _check_type(name: str, value: Any, annotation: Any) -> None:
    """Raise ValueError unless ``value`` (parsed JSON) fits ``annotation`` (int, float, str, bool, X | None)."""
    allowed = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else (annotation,)
    )
    for kind in allowed:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if kind in (str, bool, type(None)) and isinstance(value, kind):
            return
    expected = " or ".join(_JSON_NAMES.get(kind, str(kind)) for kind in allowed)
    raise ValueError(f"config field {name} must be {expected}, got {json.dumps(value)}")
