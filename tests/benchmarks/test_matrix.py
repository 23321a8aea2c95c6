"""benchmarks/matrix.py: rows land one by one, a rerun replaces its own row, the table ratios each
recipe to the best baseline of its cell."""

from __future__ import annotations

import json

import matrix


def _row(recipe: str, ppl: float, track: str = "stock", calibration: str = "bundled") -> dict:
    return dict(
        model="smollm2",
        calibration=calibration,
        track=track,
        recipe=recipe,
        sparsity=0.3,
        ppl_2048=ppl,
        prune_seconds=10.0,
        row_seconds=60.0,
        machine="test machine",
    )


def test_rows_append_and_a_rerun_replaces_its_row(tmp_path, monkeypatch):
    monkeypatch.setattr(matrix, "RESULTS", tmp_path / "matrix.json")
    monkeypatch.setattr(matrix, "TABLE", tmp_path / "matrix.md")
    matrix.append_row(_row("fasp", 52.0))
    matrix.append_row(_row("spap-ls", 50.0))
    matrix.append_row(_row("fasp", 51.0))  # the same key again
    rows = json.loads((tmp_path / "matrix.json").read_text())["rows"]
    assert [(r["recipe"], r["ppl_2048"]) for r in rows] == [("spap-ls", 50.0), ("fasp", 51.0)]
    table = (tmp_path / "matrix.md").read_text()
    assert "| spap-ls | 50.00 (0.98x), 10 s |" in table and "| fasp | 51.00, 10 s |" in table


def test_depth_rows_are_compared_with_the_stock_baselines():
    rows = [_row("fasp", 50.0), _row("depth-only", 75.0, track="depth")]
    assert matrix.best_baseline(rows, "depth", "bundled") == 50.0
    assert "75.00 (1.50x)" in matrix.markdown(rows)


def test_the_estimate_is_the_longest_earlier_row_of_the_recipe():
    rows = [_row("fasp", 50.0), {**_row("fasp", 50.0, calibration="wikitext2-valid"), "row_seconds": 240.0}]
    assert matrix.estimate_minutes(_row("fasp", 0), rows) == 4.0
    assert matrix.estimate_minutes(_row("cfsp-uniform", 0), rows) == matrix.MODELS["smollm2"]["guess_minutes"]


def test_the_geometric_mean_covers_the_recipes_present_in_every_stock_cell():
    rows = [_row("fasp", 50.0), _row("spap-ls", 45.0), _row("spap", 55.0)]
    valid = dict(calibration="wikitext2-valid")
    rows += [{**_row("fasp", 40.0), **valid}, {**_row("spap-ls", 40.0 * 1.1), **valid}]
    means = matrix.geomeans(rows)
    assert set(means) == {"fasp", "spap-ls"}  # spap lacks the in-domain cell
    assert means["fasp"] == (1.0, 2)
    assert abs(means["spap-ls"][0] - (0.9 * 1.1) ** 0.5) < 1e-12
    assert "| spap-ls | 0.995 |" in matrix.markdown(rows)


def test_the_any_width_track_gets_its_own_geometric_mean_against_its_own_baselines():
    any_width = dict(track="any-width")
    rows = [{**_row("cfsp", 40.0), **any_width}, {**_row("spap-ls-global", 36.0), **any_width}]
    rows += [_row("fasp", 30.0), _row("spap-ls", 33.0)]  # stock: its own best baseline
    assert matrix.geomeans(rows, "any-width") == {"cfsp": (1.0, 1), "spap-ls-global": (0.9, 1)}
    assert matrix.geomeans(rows)["spap-ls"] == (1.1, 1)
    table = matrix.markdown(rows)
    assert "## Any-width track over its 1 cells" in table and "| spap-ls-global | 0.900 |" in table


def test_socialiqa_scores_get_a_table_of_their_own():
    scored = {**_row("spap-ls", 45.0), "social_iqa_acc": 0.35, "social_iqa_acc_norm": 0.42, "social_iqa_n": 500}
    table = matrix.markdown([_row("fasp", 50.0), scored])
    assert (
        "## SocialIQA, first 500 items" in table and "| smollm2 | spap-ls | bundled | 0.350 | 0.420 | 45.00 |" in table
    )


def test_params_rows_get_their_own_table_against_the_baselines_at_the_same_fraction():
    width = {**_row("width-ls", 40.0, track="params"), "sparsity": 0.2, "params": 80, "params_before": 100}
    flap = {**_row("flap-uniform-ls", 50.0, track="params"), "sparsity": 0.2}
    stock = _row("fasp", 30.0)  # 30% of MLP neurons: another cell, not the params track's baseline
    table = matrix.markdown([width, flap, stock])
    assert "## smollm2, 20% of all parameters removed" in table
    assert "| width-ls | 40.00 (0.80x), 20.0% removed, 10 s |" in table
    assert "| width-ls | " not in table.split("## smollm2, 20% of all")[0]  # not in the MLP-sparsity tables


def test_every_params_fraction_has_its_equal_parameter_mixes():
    for spec in matrix.MODELS.values():
        for fraction, mix in spec.get("params", {}).items():
            assert 0 < mix["mlp"] < 1 and mix["layers"] > 0 and 0 < mix["heads"][1] < mix["mlp"], fraction
