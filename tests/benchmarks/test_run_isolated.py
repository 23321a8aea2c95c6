"""benchmarks/common.run_isolated: the row process does not outlive a killed benchmark."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

SLEEPER = """import os, time
def sleep_forever(job):
    with open(job["pid_file"] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(job["pid_file"] + ".tmp", job["pid_file"])
    time.sleep(600)
    return {}
"""


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _wait(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_row_process_ends_when_the_benchmark_is_killed(tmp_path):
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    pid_file = tmp_path / "row.pid"
    script = (
        f"import sys; sys.path[:0] = [{str(BENCHMARKS)!r}, {str(tmp_path)!r}]\n"
        "from common import run_isolated\nfrom sleeper import sleep_forever\n"
        f"run_isolated({{'pid_file': {str(pid_file)!r}}}, sleep_forever)\n"
    )
    benchmark = subprocess.Popen([sys.executable, "-c", script])
    row = None
    try:
        assert _wait(pid_file.exists, 120), "the row process never started"
        row = int(pid_file.read_text())
        assert _alive(row)
        benchmark.kill()  # SIGKILL: no cleanup in the benchmark process at all
        benchmark.wait()
        assert _wait(lambda: not _alive(row), 30), "the row process outlived the killed benchmark"
    finally:
        benchmark.kill()
        if row is not None and _alive(row):
            os.kill(row, 9)
