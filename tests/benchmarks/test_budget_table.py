"""benchmarks/budget_table.py: each way of spending the budget is set against width only and the
best stock baseline of its cell, and takes the llama.cpp speed of its own checkpoint."""

from __future__ import annotations

import budget_table


def _row(recipe: str, ppl: float, layers: int, track: str = "depth") -> dict:
    return dict(
        model="m",
        calibration="wikitext2-valid",
        track=track,
        recipe=recipe,
        ppl_2048=ppl,
        params=80,
        params_before=100,
        widths=[1] * layers,
        command=f"spap prune {recipe}",
        sparsity=0.3,
    )


def test_ratios_and_speeds_land_on_their_rows():
    matrix = [
        _row("spap-ls", 40.0, 10, "stock"),
        _row("fasp", 50.0, 10, "stock"),
        _row("flap-uniform-ls", 44.0, 10, "stock"),
        _row("depth-only", 60.0, 8),
        _row("spap", 39.0, 10, "stock"),  # not a way of spending the budget here, not a baseline
        {**_row("spap-ls", 30.0, 10, "stock"), "sparsity": 0.2},  # another MLP sparsity: not this cell
        {**_row("fasp", 31.0, 10, "stock"), "sparsity": 0.5},
    ]
    speeds = [
        {"model": "m", "checkpoint": "depth-2", "decode_speedup": 1.3, "prefill_speedup": 1.4},
        {"model": "m", "checkpoint": "mlp-30", "decode_speedup": 1.1, "prefill_speedup": 1.2},
        {"model": "other", "checkpoint": "depth-2", "decode_speedup": 9.0, "prefill_speedup": 9.0},
    ]
    rows = {r["recipe"]: r for r in budget_table.build(matrix, speeds)}
    assert set(rows) == {"spap-ls", "depth-only"}
    depth = rows["depth-only"]
    assert depth["ppl_vs_width"] == 1.5 and depth["best_baseline"] == "flap-uniform-ls"
    assert depth["ppl_vs_best_baseline"] == round(60 / 44, 3) and depth["parameters_removed"] == 0.2
    assert (depth["llamacpp_decode_speedup"], depth["llamacpp_prefill_speedup"]) == (1.3, 1.4)
    assert rows["spap-ls"]["llamacpp_decode_speedup"] == 1.1
    assert (
        "| m | wikitext2-valid | 30% of MLP neurons | whole layers, repaired | 20.0% | 8 | 60.0 | 1.5 |"
        in budget_table.markdown(list(rows.values()))
    )


def test_params_cells_set_each_recipe_against_width_and_their_own_baselines():
    at = dict(sparsity=0.2)
    matrix = [
        {**_row("width-ls", 40.0, 10, "params"), **at},
        {**_row("budget-ls", 38.0, 10, "params"), **at},
        {**_row("fasp", 50.0, 10, "params"), **at},
        {**_row("fasp", 20.0, 10, "params"), "sparsity": 0.3, "calibration": "bundled"},  # another cell
        _row("fasp", 10.0, 10, "stock"),  # the MLP-sparsity cell's baseline, not this one's
    ]
    speeds = [
        {"model": "m-params", "checkpoint": "width-20p", "decode_speedup": 1.2, "prefill_speedup": 1.3},
        {"model": "m-params", "checkpoint": "width-30p", "decode_speedup": 9.0, "prefill_speedup": 9.0},
    ]
    rows = {r["recipe"]: r for r in budget_table.build(matrix, speeds)}
    assert set(rows) == {"width-ls", "budget-ls"}
    assert (rows["width-ls"]["llamacpp_decode_speedup"], rows["width-ls"]["llamacpp_prefill_speedup"]) == (1.2, 1.3)
    # the search chose width only: the same shapes, so width's checkpoint gives its speed
    assert rows["budget-ls"]["llamacpp_decode_speedup"] == 1.2
    assert rows["budget-ls"]["budget"] == "20% of all parameters"
    assert rows["budget-ls"]["ppl_vs_width"] == 0.95 and rows["budget-ls"]["ppl_vs_best_baseline"] == 0.76


def test_a_search_without_a_measured_twin_has_no_speed():
    at = dict(sparsity=0.2)
    matrix = [
        {**_row("width-ls", 40.0, 10, "params"), **at},
        {**_row("budget-ls", 38.0, 8, "params"), **at},  # chose two layers: shapes of its own
        {**_row("heads-mlp", 45.0, 10, "params"), **at, "params": 79},
    ]
    speeds = [
        {"model": "m-params", "checkpoint": "width-20p", "decode_speedup": 1.2, "prefill_speedup": 1.3},
        {"model": "m-params", "checkpoint": "heads-20p", "decode_speedup": 1.1, "prefill_speedup": 1.0},
    ]
    rows = {r["recipe"]: r for r in budget_table.build(matrix, speeds)}
    assert rows["budget-ls"]["llamacpp_decode_speedup"] is None
    assert rows["heads-mlp"]["llamacpp_decode_speedup"] == 1.1


def test_per_layer_widths_also_face_the_any_width_baseline():
    at = dict(sparsity=0.3)
    matrix = [
        {**_row("width-ls", 40.0, 10, "params"), **at},
        {**_row("width-ls-angular", 33.0, 10, "params"), **at},
        {**_row("fasp", 44.0, 10, "params"), **at},
        {**_row("cfsp", 36.0, 10, "params"), **at},  # any-width: a baseline for per-layer widths only
    ]
    rows = {r["recipe"]: r for r in budget_table.build(matrix, [])}
    assert rows["width-ls"]["best_baseline"] == "fasp"
    assert rows["width-ls-angular"]["best_baseline"] == "cfsp"
