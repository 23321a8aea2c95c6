"""spap: structured pruning of Hugging Face causal LMs (SPAP, StructPrune allocation, baselines)."""

__version__ = "0.1.0"

from .checkpoint import load_pretrained, save_pruned  # noqa: E402
from .config import CalibrationConfig, PruneConfig  # noqa: E402
from .core.solver_config import SolverConfig  # noqa: E402
from .pipeline import PruneReport, prune  # noqa: E402

__all__ = [
    "CalibrationConfig",
    "PruneConfig",
    "PruneReport",
    "SolverConfig",
    "load_pretrained",
    "prune",
    "save_pruned",
]
