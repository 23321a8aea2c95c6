"""spap: structured pruning of Hugging Face causal LMs (SPAP, StructPrune allocation, baselines)."""

__version__ = "0.1.0"

from .api import CheckpointResult, Plan, plan_checkpoint, prune_checkpoint  # noqa: E402
from .config import CalibrationConfig, ExperimentalConfig, PruneConfig, RuntimeConfig  # noqa: E402
from .core.solver_config import SolverConfig  # noqa: E402
from .io.checkpoint import load_pretrained, save_pruned  # noqa: E402
from .pruning.pipeline import PruneReport, prune  # noqa: E402

__all__ = [
    "CalibrationConfig",
    "CheckpointResult",
    "ExperimentalConfig",
    "Plan",
    "PruneConfig",
    "PruneReport",
    "RuntimeConfig",
    "SolverConfig",
    "load_pretrained",
    "plan_checkpoint",
    "prune",
    "prune_checkpoint",
    "save_pruned",
]
