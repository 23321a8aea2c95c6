"""``spap.prune_checkpoint`` does what ``spap prune`` does: the same files, byte for byte."""

from __future__ import annotations

import json

import pytest

import spap
from spap.cli import main
from spap.errors import UsageError

from .cli.test_cli_failures import _nothing_left

VOLATILE = {"seconds", "memory", "command", "versions"}  # timings, peak memory, the CLI's own line


@pytest.fixture()
def calib(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    return text


def _stable_record(directory) -> dict:
    record = json.loads((directory / "pruning.json").read_text())
    for layer in record["layers"]:
        del layer["seconds"]
    return {k: v for k, v in record.items() if k not in VOLATILE}


@pytest.mark.parametrize("offload", ["never", "always"])
def test_the_api_writes_the_bytes_the_cli_writes(tiny_checkpoint, tmp_path, calib, offload):
    by_cli, by_api = tmp_path / "cli", tmp_path / "api"
    flags = ["--sparsity", "0.25", "--calib", str(calib), "--n-samples", "4", "--seq-len", "32"]
    flags += ["--compute-dtype", "float32", "--refit-rounds", "2", "--offload", offload, "--max-host-memory", "8"]
    assert main(["prune", str(tiny_checkpoint), "--out", str(by_cli), *flags]) == 0
    config = spap.PruneConfig(
        sparsity=0.25,
        calibration=spap.CalibrationConfig(str(calib), n_samples=4, seq_len=32),
        solver=spap.SolverConfig(refit_rounds=2),
        runtime=spap.RuntimeConfig(compute_dtype="float32", max_host_memory_gib=8),
    )
    result = spap.prune_checkpoint(str(tiny_checkpoint), by_api, config, offload=offload)
    assert result.out == by_api and result.stock and result.offloaded == (offload == "always")
    assert sorted(p.name for p in by_cli.iterdir()) == sorted(p.name for p in by_api.iterdir())
    for file in by_cli.iterdir():
        if file.name != "pruning.json":
            assert file.read_bytes() == (by_api / file.name).read_bytes(), file.name
    assert _stable_record(by_cli) == _stable_record(by_api)
    assert (
        config.runtime.max_host_memory_gib == 8 and config.runtime.device == "auto"
    )  # the caller's config is not changed


def test_bad_arguments_raise_before_any_work(tiny_checkpoint, tmp_path, calib):
    out = tmp_path / "out"
    config = spap.PruneConfig(calibration=spap.CalibrationConfig(str(calib), n_samples=2, seq_len=32))
    with pytest.raises(UsageError, match="offload must be one of"):
        spap.prune_checkpoint(str(tiny_checkpoint), out, config, offload="sometimes")
    with pytest.raises(UsageError, match="exceeds the 128 positions"):
        spap.prune_checkpoint(str(tiny_checkpoint), out, config, ppl=[], ppl_seq_len=4096)
    assert _nothing_left(out)


def test_perplexity_before_and_after_is_in_the_result_and_the_record(tiny_checkpoint, tmp_path, calib):
    out = tmp_path / "out"
    config = spap.PruneConfig(
        sparsity=0.5, calibration=spap.CalibrationConfig(str(calib), 4, 32), solver=spap.SolverConfig(refit="ls")
    )
    result = spap.prune_checkpoint(str(tiny_checkpoint), out, config, ppl=[str(calib)], ppl_seq_len=32)
    dense, pruned = result.metrics["dense"][str(calib)], result.metrics["pruned"][str(calib)]
    assert dense["perplexity"] != pruned["perplexity"] and dense["n_windows"] == pruned["n_windows"] > 0
    assert json.loads((out / "pruning.json").read_text())["metrics"] == result.metrics


def test_the_report_line_states_the_sparsity_the_widths_have(tiny_checkpoint, tmp_path, calib):
    """With widths rounded to a multiple the line says what was removed, not what was asked."""
    lines: list[str] = []
    config = spap.PruneConfig(
        sparsity=0.3,
        width_multiple=8,
        calibration=spap.CalibrationConfig(str(calib), 4, 32),
        solver=spap.SolverConfig(refit="ls"),
    )
    result = spap.prune_checkpoint(str(tiny_checkpoint), tmp_path / "out", config, echo=lines.append)
    assert result.report.widths == [32] * 3  # 48 - round(0.3 * 48) = 34 -> 32
    assert any(line.startswith("pruned 33.3% of MLP neurons") for line in lines), lines
