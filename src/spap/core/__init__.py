"""Pure-torch algorithm core: statistics, least squares, SPAP selection, refit, scores, allocation.

Nothing in this package imports transformers.
"""

from .linalg import QuadraticLS
from .mlp import MLPWeights
from .solver import MLPPruneResult, prune_mlp
from .solver_config import METHODS, SolverConfig
from .stats import MLPStatistics, NonFiniteStatisticsError

__all__ = [
    "METHODS",
    "MLPPruneResult",
    "MLPStatistics",
    "MLPWeights",
    "NonFiniteStatisticsError",
    "QuadraticLS",
    "SolverConfig",
    "prune_mlp",
]
