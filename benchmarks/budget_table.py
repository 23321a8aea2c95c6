"""One parameter budget, four ways to spend it: results/budget.json and budget.md assembled from the
quality matrix's rows (ppl) and llama.cpp's (speed), without running anything.

    python benchmarks/budget_table.py

Per model and calibration, at the parameter count of 30% of MLP neurons (the depth track) and at 20% /
30% of all parameters (the params track): MLP width only (spap-ls), whole layers only (with and without
the repair), one KV group per layer + width, the `--target-ratio` search, and the best stock baseline
at the same count; decode and prefill speed-ups in llama.cpp where that checkpoint
was measured there (same model and calibration, one run per model; see benchmarks/llamacpp.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MATRIX = ROOT / "results" / "matrix.json"
LLAMACPP = ROOT / "results" / "llamacpp.json"
OUT = ROOT / "results" / "budget.json"
TABLE = ROOT / "results" / "budget.md"

RECIPES = {  # matrix recipe -> (what it spends the budget on, llama.cpp checkpoint label)
    "spap-ls": ("MLP width (spap-ls)", "mlp-30"),
    "depth-only": ("whole layers, repaired", "depth-{layers}"),
    "depth-only-norepair": ("whole layers, no repair", None),
    "heads-mlp": ("1 KV group per layer + MLP width", "heads-mlp"),
    "budget-ls": ("--target-ratio search", None),
}
BASELINES = ("wanda-sp", "fasp", "flap-uniform-ls", "cfsp-uniform")
SPEED_CALIBRATION = "wikitext2-valid"  # the llama.cpp checkpoints were calibrated in domain


PARAMS_RECIPES = {  # the matrix's "params" track: a fraction of all parameters
    "width-ls": ("MLP width (spap-ls)", "width-{percent}p"),
    "depth-only": ("whole layers, repaired", "depth-{percent}p"),
    "heads-mlp": ("1 KV group per layer + MLP width", "heads-{percent}p"),
    "budget-ls": ("--target-ratio search", None),
    "budget-ls-global": ("--target-ratio search, per-layer widths", None),
    "width-ls-angular": ("MLP width per layer (angular; any-width)", None),
}
PARAMS_BASELINES = ("fasp", "flap-uniform-ls")
ANY_WIDTH = {"budget-ls-global": ("cfsp",), "width-ls-angular": ("cfsp",)}
"""Per-layer-width recipes (spap.load_pretrained) also face the any-width baselines of their cell."""


def build(matrix: list[dict[str, Any]], speeds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for model, calibration in sorted({(r["model"], r["calibration"]) for r in matrix if r["track"] == "depth"}):
        found = {
            r["recipe"]: r
            for r in matrix
            if r["model"] == model
            and r["calibration"] == calibration
            and (r["track"] == "depth" or (r["track"] == "stock" and r["sparsity"] == 0.3))
        }
        cell_speeds = [s for s in speeds if s["model"] == model] if calibration == SPEED_CALIBRATION else []
        rows += _cell(found, RECIPES, BASELINES, "spap-ls", "30% of MLP neurons", cell_speeds)
    params = sorted({(r["model"], r["calibration"], r["sparsity"]) for r in matrix if r["track"] == "params"})
    for model, calibration, fraction in params:
        found = {
            r["recipe"]: r
            for r in matrix
            if (r["model"], r["calibration"], r.get("sparsity"), r["track"]) == (model, calibration, fraction, "params")
        }
        # llama.cpp rows of the params checkpoints: model "<model>-params", labels "width-30p", "depth-30p"
        cell_speeds = [s for s in speeds if s["model"] == f"{model}-params"] if calibration == SPEED_CALIBRATION else []
        budget = f"{fraction:.0%} of all parameters"
        rows += _cell(found, PARAMS_RECIPES, PARAMS_BASELINES, "width-ls", budget, cell_speeds, round(100 * fraction))
    return rows


def _cell(
    found: dict[str, dict[str, Any]],
    recipes: dict[str, tuple[str, str | None]],
    baselines: tuple[str, ...],
    width_recipe: str,
    budget: str,
    speeds: list[dict[str, Any]],
    percent: int | None = None,
) -> list[dict[str, Any]]:
    """One row per way of spending the budget in the cell ``found`` (recipe -> matrix row), set against
    width only and the cell's best baseline, with the llama.cpp speed of its checkpoint in ``speeds``."""
    width = found.get(width_recipe)
    dense_layers = len(width["widths"]) if width else None
    rows = []
    for recipe, (spends, label) in recipes.items():
        row = found.get(recipe)
        if row is None:
            continue
        present = [found[b] for b in (*baselines, *ANY_WIDTH.get(recipe, ())) if b in found]
        best = min(present, key=lambda r: r["ppl_2048"]) if present else None
        if label and "{layers}" in label and dense_layers:
            label = label.format(layers=dense_layers - len(row["widths"]))
        if label and "{percent}" in label:
            label = label.format(percent=percent)
        if label is None:  # a search: the speed of the recipe whose shapes it chose, if one has them
            same = [r for name, r in found.items() if name in recipes and _shape(r) == _shape(row)]
            twin = next((recipes[r["recipe"]][1] for r in same if recipes[r["recipe"]][1]), None)
            label = twin.format(percent=percent) if twin and percent is not None else twin
        speed = next((s for s in speeds if s["checkpoint"] == label), None) if label else None
        rows.append(
            {
                "model": row["model"],
                "calibration": row["calibration"],
                "budget": budget,
                "recipe": recipe,
                "spends": spends,
                "parameters_removed": round(1 - row["params"] / row["params_before"], 4),
                "layers": len(row["widths"]),
                "ppl_2048": round(row["ppl_2048"], 2),
                "ppl_vs_width": round(row["ppl_2048"] / width["ppl_2048"], 3) if width else None,
                "ppl_vs_best_baseline": round(row["ppl_2048"] / best["ppl_2048"], 3) if best else None,
                "best_baseline": best["recipe"] if best else None,
                "best_baseline_ppl": round(best["ppl_2048"], 2) if best else None,
                "llamacpp_checkpoint": label if speed else None,  # its row in llamacpp.json (same recipe)
                "llamacpp_decode_speedup": speed["decode_speedup"] if speed else None,
                "llamacpp_prefill_speedup": speed["prefill_speedup"] if speed else None,
                "command": row["command"],
            }
        )
    return rows


def _shape(row: dict[str, Any]) -> tuple[Any, ...]:
    """What llama.cpp's speed depends on: the MLP widths and the parameter count (layers and heads)."""
    return tuple(row["widths"]), row["params"]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# One budget, four ways (generated by benchmarks/budget_table.py from matrix.json and llamacpp.json)",
        "",
        "| model | calibration | budget | spends it on | removed | layers | ppl@2048 | / width | / best baseline "
        "| decode (llama.cpp) | prefill |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = lambda v: f"{v:.2f}x" if v is not None else "-"  # noqa: E731
        lines.append(
            f"| {r['model']} | {r['calibration']} | {r['budget']} | {r['spends']} | {r['parameters_removed']:.1%} | {r['layers']} "
            f"| {r['ppl_2048']} | {r['ppl_vs_width']} | {r['ppl_vs_best_baseline']} ({r['best_baseline']} "
            f"{r['best_baseline_ppl']}) | {speed(r['llamacpp_decode_speedup'])} | "
            f"{speed(r['llamacpp_prefill_speedup'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    matrix = json.loads(MATRIX.read_text())["rows"]
    speeds = json.loads(LLAMACPP.read_text())["rows"] if LLAMACPP.is_file() else []
    rows = build(matrix, speeds)
    OUT.write_text(json.dumps({"meta": {"script": "benchmarks/budget_table.py"}, "rows": rows}, indent=1) + "\n")
    TABLE.write_text(markdown(rows))
    print(TABLE.read_text())


if __name__ == "__main__":
    main()
