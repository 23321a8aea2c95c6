"""``spap prune``'s flags are generated from PruneConfig's fields: every field has exactly one flag that
reaches it, the main help hides the expert and experimental ones, and older config files still load."""

from __future__ import annotations

import json
from typing import Any

import pytest

from spap.cli import main
from spap.cli.parser import build_parser, config_flags, config_from_args
from spap.config import CONFIG_VERSION, PruneConfig, flag_fields


def _get(tree: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        tree = tree[key]
    return tree


def _other_value(path: str, default: Any, choices: tuple[str, ...] | None) -> Any:
    """A valid value of the field other than its default."""
    if choices:
        return next(c for c in choices if c != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default + 1 if default >= 1 else default / 2 if default > 0 else 0.5
    if default is None:
        return 64 if path == "width_multiple" else 0.5  # target_ratio, max_host_memory_gib
    return {"runtime.device": "cpu", "runtime.compute_dtype": "float32"}.get(path, "text.txt")


def _flag_of(path: str) -> str:
    return next(f.metadata.get("flag") or "--" + f.name.replace("_", "-") for p, f in flag_fields() if p == path)


def _config(*flags: str) -> PruneConfig:
    return config_from_args(build_parser().parse_args(["prune", "--out", "unused", *flags]))


@pytest.mark.parametrize("path", [p for p, _ in flag_fields() if not p.endswith("seed")])
def test_every_config_field_has_a_flag_that_reaches_it(path):
    default = _get(PruneConfig().to_dict(), path)
    field = dict(flag_fields())[path]
    value = _other_value(path, default, field.metadata.get("choices"))
    flag = _flag_of(path)
    args = [flag] if isinstance(value, bool) else [flag, str(value)]
    got = _config(*args).to_dict()
    assert _get(got, path) == value
    changed = [p for p, _ in flag_fields() if _get(got, p) != _get(PruneConfig().to_dict(), p)]
    assert changed == [path]  # and no other field


def test_seed_sets_the_run_and_the_calibration_seed():
    cfg = _config("--seed", "7")
    assert cfg.seed == cfg.calibration.seed == 7
    assert config_flags()["seed"] == ("seed", "calibration.seed")


def test_no_two_fields_share_a_flag_except_the_seed():
    shared = {dest: paths for dest, paths in config_flags().items() if len(paths) > 1}
    assert shared == {"seed": ("seed", "calibration.seed")}


def test_main_help_hides_expert_and_experimental_flags(capsys):
    assert main(["prune", "--help"]) == 0
    short = capsys.readouterr().out
    assert main(["prune", "--help-all"]) == 0
    full = capsys.readouterr().out
    for flag in ("--sparsity", "--method", "--refit", "--calib", "--device", "--target-ratio"):
        assert flag in short
    for flag in ("--refit-proximal", "--token-weighting", "--error-correction", "--penalty-rounds", "--batch-size"):
        assert flag not in short and flag in full
    assert "experimental" in full and "experimental" not in short


def test_a_version_2_config_loads_into_its_sections():
    old = {"version": 2, "sparsity": 0.2, "device": "cpu", "compute_dtype": "float32", "batch_size": 2}
    old |= {"max_host_memory_gib": 4.0, "token_weighting": "residual", "error_correction": 0.5}
    cfg = PruneConfig.from_dict(old)
    assert (cfg.sparsity, cfg.runtime.device, cfg.runtime.compute_dtype, cfg.runtime.batch_size) == (
        0.2,
        "cpu",
        "float32",
        2,
    )
    assert cfg.runtime.max_host_memory_gib == 4.0
    assert (cfg.experimental.token_weighting, cfg.experimental.error_correction) == ("residual", 0.5)
    assert PruneConfig.from_json(cfg.to_json()) == cfg and json.loads(cfg.to_json())["version"] == CONFIG_VERSION
