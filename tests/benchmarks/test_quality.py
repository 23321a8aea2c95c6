"""benchmarks/quality.py: the job plan evaluates the dense model exactly once."""

from __future__ import annotations

from quality import plan_jobs


def test_dense_runs_once_even_when_named_in_methods():
    jobs = plan_jobs(["dense", "spap", "fasp"], [0.2, 0.3])
    assert jobs == [("dense", 0.0), ("spap", 0.2), ("fasp", 0.2), ("spap", 0.3), ("fasp", 0.3)]
    assert plan_jobs(["spap"], [0.3]) == [("dense", 0.0), ("spap", 0.3)]
