"""Tests of the scripts in benchmarks/, which import each other as top-level modules."""

import sys
from pathlib import Path

_BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path[:0] = [str(_BENCHMARKS), str(_BENCHMARKS / "studies")]
