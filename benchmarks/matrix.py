"""The quality matrix: every (model, calibration, track, recipe, sparsity) row one `spap prune` +
`spap eval` in fresh processes, appended to results/matrix.json as soon as it finishes; rows already
there are skipped, so the benchmark resumes where it stopped.

    python benchmarks/matrix.py --models smollm2 --sparsities 0.3 --max-minutes 120

Sizes (fixed so that a row fits in about 30 minutes on a 2-core CPU): SmolLM2-135M with 16 x 2048
calibration tokens and the first 32 WikiText-2 test windows of 2048 tokens; Qwen2.5-Coder-0.5B with
8 x 2048 and 16 windows. Calibrations: the bundled novel (out of domain) and WikiText-2 validation
(in domain, disjoint from the test split). Tracks: "stock" (one MLP width in every layer, plain
``from_pretrained`` loads it; per-layer baselines run uniform) and "any-width" (per-layer widths).
``--max-minutes`` launches no row whose estimate (the longest earlier row of that model and recipe,
else a per-model guess) would end past the budget. results/matrix.md is regenerated after each row.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import machine, pin_gguf_float32  # noqa: E402
from fetch_models import fetch, gguf_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "matrix.json"  # --results moves both
TABLE = ROOT / "results" / "matrix.md"
DATA = ROOT.parent / "shared" / "data"

MODELS: dict[str, dict[str, Any]] = {
    # name: what `spap prune` is given, calibration sequences, evaluation windows, guessed minutes a row
    # equal_ratio / equal_layers / equal_heads: the parameter fraction that 30% of MLP neurons removes, the
    # whole layers closest to it, and one KV group per layer with the MLP sparsity that completes it (the
    # depth track compares at the same parameter count)
    "smollm2": {
        "path": "smollm2",
        "n_samples": 16,
        "windows": 32,
        "guess_minutes": 8,
        "equal_ratio": 0.178,
        "equal_layers": 7,
        "equal_heads": [0.34, 0.189],  # 1 of 3 KV groups per layer + this MLP sparsity
        # the "params" track, keyed by the fraction of all parameters removed: MLP sparsity alone, whole
        # layers nearest to it, 1 of 3 KV groups per layer + MLP sparsity (134.5M parameters, 28.3M embeddings)
        "params": {
            0.2: {"mlp": 0.3379, "layers": 8, "heads": [0.34, 0.2268]},
            0.3: {"mlp": 0.5068, "layers": 11, "heads": [0.34, 0.3957]},
        },
    },
    "qwen2.5-coder-0.5b": {
        "path": str(gguf_path("qwen2.5-coder-0.5b")),  # assembled by fetch_models.py
        "n_samples": 8,
        "windows": 16,
        "guess_minutes": 16,
        "equal_ratio": 0.1494,  # of 630M: the cache holds the output embedding apart from the input one
        "equal_layers": 6,
        "equal_heads": [0.5, 0.23],  # 1 of 2 KV groups per layer + this MLP sparsity
        "params": {  # of 630.2M (313.8M in MLPs, 14.91M a layer, 0.92M a KV group with its 7 query heads)
            0.2: {"mlp": 0.4017, "layers": 8, "heads": [0.5, 0.3314]},
            0.3: {"mlp": 0.6025, "layers": 13, "heads": [0.5, 0.5323]},
        },
    },
}
CALIBRATIONS = {"bundled": "bundled", "wikitext2-valid": "wikitext-2/wiki.valid.tokens"}
RECIPES: dict[str, dict[str, list[str]]] = {
    # track: recipe name -> `spap prune` flags
    "stock": {
        "spap": ["--method", "spap"],
        "spap-ls": ["--method", "spap", "--refit", "ls"],
        "wanda-sp": ["--method", "wanda-sp"],
        "fasp": ["--method", "fasp"],
        # FLAP's bias compensation adds a down-projection bias that stock LLaMA/Qwen classes lack
        "flap-uniform-ls": ["--method", "flap", "--allocation", "uniform", "--refit", "ls"],
        "cfsp-uniform": ["--method", "cfsp", "--allocation", "uniform"],
    },
    "depth": {  # at the parameter count of 30% of MLP neurons ({ratio}, {layers}: per model)
        "depth-only": ["--sparsity", "0", "--drop-layers", "{layers}"],
        "depth-only-norepair": ["--sparsity", "0", "--drop-layers", "{layers}", "--no-depth-repair"],
        "heads-mlp": ["--target", "both", "--head-sparsity", "{head_fraction}", "--sparsity", "{head_mlp}"],
        "budget-ls": ["--target-ratio", "{ratio}", "--refit", "ls"],
        "budget-ls-norepair": ["--target-ratio", "{ratio}", "--refit", "ls", "--no-depth-repair"],
    },
    "params": {  # a fraction of all parameters ({p_*}: per model and fraction; the row's sparsity is the fraction)
        "width-ls": ["--sparsity", "{p_mlp}", "--refit", "ls"],
        "depth-only": ["--sparsity", "0", "--drop-layers", "{p_layers}"],
        "heads-mlp": ["--target", "both", "--head-sparsity", "{p_head_fraction}", "--sparsity", "{p_head_mlp}"],
        "budget-ls": ["--target-ratio", "{p_ratio}", "--refit", "ls"],
        # the same search, the final run's widths allocated per layer (any-width: spap.load_pretrained)
        "budget-ls-global": ["--target-ratio", "{p_ratio}", "--refit", "ls", "--allocation", "global"],
        "flap-uniform-ls": ["--method", "flap", "--allocation", "uniform", "--refit", "ls", "--sparsity", "{p_mlp}"],
        "fasp": ["--method", "fasp", "--sparsity", "{p_mlp}"],
        # any width at the same count: spap's per-layer widths, and CFSP's (its own allocation)
        "width-ls-angular": ["--sparsity", "{p_mlp}", "--refit", "ls", "--allocation", "angular"],
        "cfsp": ["--method", "cfsp", "--sparsity", "{p_mlp}"],
    },
    "any-width": {
        "flap": ["--method", "flap"],
        "cfsp": ["--method", "cfsp"],
        "spap-ls-angular": ["--method", "spap", "--refit", "ls", "--allocation", "angular"],
        "spap-angular": ["--method", "spap", "--allocation", "angular"],
        "spap-ls-structprune": ["--method", "spap", "--refit", "ls", "--allocation", "structprune"],
        # FLAP's allocation (standardised fluctuation, ranked globally) with spap's selection and least
        # squares; with a refit down bias, as FLAP compensates with one (spap.load_pretrained loads it)
        "spap-ls-global": ["--method", "spap", "--refit", "ls", "--allocation", "global"],
        "spap-ls-global-bias": ["--method", "spap", "--refit", "ls", "--allocation", "global", "--fit-bias", "yes"],
        # FLAP's selection and allocation, W_down refit by least squares instead of its bias compensation
        "flap-ls": ["--method", "flap", "--refit", "ls"],
        # uniform, global and angular each measured on held-out calibration windows, the best kept
        "spap-ls-search": ["--method", "spap", "--refit", "ls", "--allocation", "search"],
    },
}
BASELINES = {"wanda-sp", "fasp", "flap-uniform-ls", "cfsp-uniform", "flap", "cfsp"}
SEQ_LEN = 2048
KEY = ("model", "calibration", "track", "recipe", "sparsity")


def load_rows() -> list[dict[str, Any]]:
    return json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []


def append_row(row: dict[str, Any]) -> None:
    rows = [r for r in load_rows() if tuple(r.get(k) for k in KEY) != tuple(row.get(k) for k in KEY)]
    rows.append(row)
    RESULTS.write_text(json.dumps({"meta": {"script": "benchmarks/matrix.py"}, "rows": rows}, indent=1) + "\n")
    TABLE.write_text(markdown(rows))


def _run(command: list[str], log: Path) -> None:
    with log.open("a") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(command[:3])} ... exited {done.returncode}: {' | '.join(tail)}")


def _spap() -> list[str]:
    return [sys.executable, "-m", "spap.cli"]


def eval_ppl(directory: str, windows: int, log: Path) -> tuple[float, str]:
    """WikiText-2 test perplexity at 2048 of the checkpoint ``directory`` (first ``windows`` windows)."""
    test = str(DATA / "wikitext-2-raw" / "wiki.test.raw")
    _run([*_spap(), "eval", directory, "--ppl", test, "--seq-len", str(SEQ_LEN), "--max-windows", str(windows)], log)
    from spap.io.models import resolve_model

    result = json.loads((Path(resolve_model(directory)) / "eval.json").read_text())["perplexity"][test]
    return float(result["perplexity"]), str(result.get("dtype", ""))


SOCIAL_IQA_ITEMS = 500


def eval_social_iqa(directory: str, log: Path) -> dict[str, float]:
    """SocialIQA acc and acc_norm of the checkpoint ``directory`` on its first 500 items."""
    task = str(DATA / "zeroshot" / "social_iqa.json")
    _run([*_spap(), "eval", directory, "--tasks", task, "--limit", str(SOCIAL_IQA_ITEMS)], log)
    from spap.io.models import resolve_model

    scores = json.loads((Path(resolve_model(directory)) / "eval.json").read_text())["zeroshot"]
    result = next(iter(scores.values()))
    return {"social_iqa_acc": result["acc"], "social_iqa_acc_norm": result["acc_norm"], "social_iqa_n": result["n"]}


def run_row(spec: dict[str, Any], work: Path, log: Path, zeroshot: bool = False) -> dict[str, Any]:
    """One prune + eval in fresh processes; the row as results/matrix.json holds it."""
    model = MODELS[spec["model"]]
    calib = CALIBRATIONS[spec["calibration"]]
    calib = calib if calib == "bundled" else str(DATA / calib)
    out = work / "pruned"
    shutil.rmtree(out, ignore_errors=True)
    heads = model.get("equal_heads", ["", ""])
    budget = model.get("params", {}).get(spec["sparsity"], {"mlp": "", "layers": "", "heads": ["", ""]})
    fill = {
        "ratio": model.get("equal_ratio", ""),
        "layers": model.get("equal_layers", ""),
        "head_fraction": heads[0],
        "head_mlp": heads[1],
        "p_ratio": spec["sparsity"],
        "p_mlp": budget["mlp"],
        "p_layers": budget["layers"],
        "p_head_fraction": budget["heads"][0],
        "p_head_mlp": budget["heads"][1],
    }
    flags = [flag.format(**fill) for flag in RECIPES[spec["track"]][spec["recipe"]]]
    command = [*_spap(), "prune", model["path"], "--sparsity", str(spec["sparsity"]), "--out", str(out)]
    # a recipe's own --sparsity (depth track) comes later on the command line and wins
    command += ["--calib", calib, "--n-samples", str(model["n_samples"]), "--seq-len", str(SEQ_LEN)]
    command += ["--width-multiple", "1", *flags]  # methods compared at the exact sparsity
    started = time.perf_counter()
    _run(command, log)
    report = json.loads((out / "pruning.json").read_text())
    ppl, dtype = eval_ppl(str(out), model["windows"], log)
    stock = not (out / "modeling_spap.py").exists()
    row = {
        **spec,
        "method": report["config"]["solver"]["method"],
        "params": report["parameters_after"],
        "params_before": report["parameters_before"],
        "ppl_2048": ppl,
        "eval_dtype": dtype,
        "eval_windows": model["windows"],
        "calibration_tokens": [model["n_samples"], SEQ_LEN],
        "prune_seconds": report["seconds"]["total"],
        "row_seconds": time.perf_counter() - started,
        "peak_rss_gib": report["memory"]["peak_rss_gib"],
        "predicted_peak_rss_gib": report.get("predicted_peak_rss_gib"),  # spap's memory model, before the run
        "stock_loadable": stock,
        "widths": report["widths"],
        "machine": machine(),
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["spap", *command[3:]]).replace(str(out), "OUT"),
    }
    if spec["track"] == "stock" and not stock:
        raise RuntimeError(f"{spec}: the stock track wrote per-layer widths")
    if zeroshot:
        row.update(eval_social_iqa(str(out), log))
    return row


def dense_row(name: str, log: Path, zeroshot: bool = False) -> dict[str, Any]:
    model = MODELS[name]
    ppl, dtype = eval_ppl(model["path"], model["windows"], log)
    extra = eval_social_iqa(model["path"], log) if zeroshot else {}
    return {
        **extra,
        "model": name,
        "calibration": "-",
        "track": "dense",
        "recipe": "dense",
        "sparsity": 0.0,
        "ppl_2048": ppl,
        "eval_dtype": dtype,
        "eval_windows": model["windows"],
        "machine": machine(),
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d"),
    }


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip()


def estimate_minutes(spec: dict[str, Any], rows: list[dict[str, Any]]) -> float:
    seen = [r["row_seconds"] / 60 for r in rows if r["model"] == spec["model"] and r.get("recipe") == spec["recipe"]]
    seen = [s for s in seen if s]
    return max(seen) if seen else MODELS[spec["model"]]["guess_minutes"]


def markdown(rows: list[dict[str, Any]]) -> str:
    """One table per (model, sparsity): recipes down, (track, calibration) across; ratio to the best
    baseline of the same cell."""
    lines = ["# Quality matrix (generated by benchmarks/matrix.py from matrix.json)", ""]
    machines = sorted({r["machine"] for r in rows})
    lines += [f"Machine(s): {'; '.join(machines)}. ppl: WikiText-2 test at 2048, first N windows (N per model).", ""]
    for model in MODELS:
        dense = [r for r in rows if r["model"] == model and r["track"] == "dense"]
        mlp_rows = [r for r in rows if r["model"] == model and r["track"] not in ("dense", "params")]
        for sparsity in sorted({r["sparsity"] for r in mlp_rows}):
            cells = [(t, c) for t in RECIPES if t != "params" for c in CALIBRATIONS]
            subset = [r for r in mlp_rows if r["sparsity"] == sparsity]
            head = f"## {model}, {sparsity:.0%} of MLP neurons"
            if dense:
                head += f" (dense ppl {dense[0]['ppl_2048']:.2f}, {dense[0]['eval_windows']} windows)"
            lines += [head, "", "| recipe | " + " | ".join(f"{t}, {c}" for t, c in cells) + " |"]
            lines.append("|---" * (len(cells) + 1) + "|")
            for recipe in dict.fromkeys(
                name for track, names in RECIPES.items() if track != "params" for name in names
            ):
                values = []
                for track, calib in cells:
                    match = [r for r in subset if (r["track"], r["calibration"], r["recipe"]) == (track, calib, recipe)]
                    best = best_baseline(subset, track, calib)
                    if not match:
                        values.append("")
                        continue
                    values.append(_cell_text(match[0], best))
                if any(values):
                    lines.append(f"| {recipe} | " + " | ".join(values) + " |")
            lines.append("")
    lines.append(
        "Ratios: ppl / the best baseline's ppl in the same column (track and calibration; the depth track, "
        "at the parameter count of 30% of MLP neurons, against the stock track's)."
    )
    lines += params_tables(rows)
    lines += ["", *geomean_table(rows), *social_iqa_table(rows)]
    return "\n".join(lines) + "\n"


def _cell_text(row: dict[str, Any], best: float | None, removed: bool = False) -> str:
    """A table cell: ppl, its ratio to the cell's best baseline (not for baselines), with ``removed``
    the fraction of parameters removed where the row records it, and the prune seconds."""
    ratio = f" ({row['ppl_2048'] / best:.2f}x)" if best and row["recipe"] not in BASELINES else ""
    size = f", {1 - row['params'] / row['params_before']:.1%} removed" if removed and row.get("params_before") else ""
    return f"{row['ppl_2048']:.2f}{ratio}{size}, {row['prune_seconds']:.0f} s"


def params_tables(rows: list[dict[str, Any]]) -> list[str]:
    """The "params" track: per model, a fraction of all parameters removed, recipes down, calibrations
    across, each ratioed to the best baseline of its own cell (the same track and fraction)."""
    lines: list[str] = []
    for model in MODELS:
        subset = [r for r in rows if r["model"] == model and r["track"] == "params"]
        for fraction in sorted({r["sparsity"] for r in subset}):
            cell_rows = [r for r in subset if r["sparsity"] == fraction]
            calibs = [c for c in CALIBRATIONS if any(r["calibration"] == c for r in cell_rows)]
            lines += [
                "",
                f"## {model}, {fraction:.0%} of all parameters removed (stock but budget-ls-global, width-ls-angular and cfsp)",
                "",
            ]
            lines += ["| recipe | " + " | ".join(calibs) + " |", "|---" * (len(calibs) + 1) + "|"]
            for recipe in RECIPES["params"]:
                values = []
                for calib in calibs:
                    match = [r for r in cell_rows if (r["calibration"], r["recipe"]) == (calib, recipe)]
                    best = best_baseline(cell_rows, "params", calib)
                    if not match:
                        values.append("")
                        continue
                    values.append(_cell_text(match[0], best, removed=True))
                if any(values):
                    lines.append(f"| {recipe} | " + " | ".join(values) + " |")
    return lines


def social_iqa_table(rows: list[dict[str, Any]]) -> list[str]:
    scored = [r for r in rows if r.get("social_iqa_acc_norm") is not None]
    if not scored:
        return []
    lines = ["", f"## SocialIQA, first {SOCIAL_IQA_ITEMS} items (stock track)", ""]
    lines += ["| model | recipe | calibration | acc | acc_norm | ppl |", "|---|---|---|---|---|---|"]
    for r in sorted(scored, key=lambda r: (r["model"], r["track"] != "dense", r["recipe"])):
        lines.append(
            f"| {r['model']} | {r['recipe']} | {r['calibration']} | {r['social_iqa_acc']:.3f} | "
            f"{r['social_iqa_acc_norm']:.3f} | {r['ppl_2048']:.2f} |"
        )
    return lines


def track_cells(rows: list[dict[str, Any]], track: str = "stock") -> list[tuple[str, str, float]]:
    """(model, calibration, sparsity) of ``track`` that hold at least one baseline row."""
    keys = {(r["model"], r["calibration"], r["sparsity"]) for r in rows if r["track"] == track}
    return sorted(k for k in keys if _cell_best(rows, *k, track) is not None)


def _cell_best(rows: list[dict[str, Any]], model: str, calibration: str, sparsity: float, track: str) -> float | None:
    subset = [r for r in rows if r["model"] == model and r["sparsity"] == sparsity]
    return best_baseline(subset, track, calibration)


def geomeans(rows: list[dict[str, Any]], track: str = "stock") -> dict[str, tuple[float, int]]:
    """recipe -> (geometric mean over ``track``'s cells of ppl / the cell's best baseline, cells), for
    the recipes present in every cell (the rule that picks ``spap prune``'s default on the stock
    track, and the documented any-width flag on the any-width track)."""
    cells = track_cells(rows, track)
    out: dict[str, tuple[float, int]] = {}
    for recipe in RECIPES[track]:
        ratios = []
        for model, calibration, sparsity in cells:
            match = [
                r["ppl_2048"]
                for r in rows
                if (r["model"], r["calibration"], r["sparsity"], r["track"], r["recipe"])
                == (model, calibration, sparsity, track, recipe)
            ]
            if match:
                ratios.append(match[0] / _cell_best(rows, model, calibration, sparsity, track))  # type: ignore[operator]
        if cells and len(ratios) == len(cells):
            out[recipe] = (math.exp(sum(math.log(x) for x in ratios) / len(ratios)), len(ratios))
    return out


def geomean_table(rows: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for track in ("stock", "any-width"):
        means = geomeans(rows, track)
        if not means:
            continue
        cells = track_cells(rows, track)
        lines += [
            f"## {track.capitalize()} track over its {len(cells)} cells: geometric mean of ppl / best baseline "
            "(lower is better)",
            "",
            "| recipe | geometric mean | mean prune time |",
            "|---|---|---|",
        ]
        for recipe, (mean, _) in sorted(means.items(), key=lambda item: item[1][0]):
            seconds = [r["prune_seconds"] for r in rows if r["track"] == track and r["recipe"] == recipe]
            lines.append(f"| {recipe} | {mean:.3f} | {sum(seconds) / len(seconds):.0f} s |")
        lines.append("")
    return lines[:-1]


def best_baseline(rows: list[dict[str, Any]], track: str, calibration: str) -> float | None:
    """The lowest baseline ppl of the cell; the depth track (stock checkpoints at the same parameter
    count) is compared with the stock track's baselines."""
    track = "stock" if track == "depth" else track
    values = [
        r["ppl_2048"]
        for r in rows
        if r["track"] == track and r["calibration"] == calibration and r["recipe"] in BASELINES
    ]
    return min(values) if values else None


def main() -> int:
    pin_gguf_float32()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--calibrations", nargs="+", default=list(CALIBRATIONS), choices=list(CALIBRATIONS))
    p.add_argument("--tracks", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--recipes", nargs="*", default=None, help="only these recipe names")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.3])
    p.add_argument("--max-minutes", type=float, default=math.inf, help="launch no row that would end past this")
    p.add_argument("--dry-run", action="store_true", help="list the rows that would run, with estimates")
    p.add_argument("--log", default=None, help="where the commands' output goes (default: a temp file)")
    p.add_argument("--results", default=None, help="directory of matrix.json and matrix.md (default: results/)")
    p.add_argument(
        "--social-iqa",
        nargs="*",
        default=[],
        metavar="RECIPE",
        help="also score SocialIQA (first 500 items) for these recipes ('dense' for the dense model); a row "
        "already there without the score is run again",
    )
    p.add_argument(
        "--keep", type=Path, default=None, help="keep each row's checkpoint in DIR/<row key> (e.g. for llamacpp.py)"
    )
    args = p.parse_args()
    global RESULTS, TABLE
    if args.results:
        RESULTS, TABLE = Path(args.results) / "matrix.json", Path(args.results) / "matrix.md"
    for model in args.models:
        if model.startswith("qwen"):
            fetch(model)
    log = Path(args.log or tempfile.mktemp(prefix="matrix-", suffix=".log"))
    started = time.monotonic()
    done = {
        tuple(r.get(k) for k in KEY)
        for r in load_rows()
        if r.get("recipe") not in args.social_iqa or "social_iqa_acc_norm" in r
    }
    todo: list[dict[str, Any]] = []
    for model in args.models:
        if (model, "-", "dense", "dense", 0.0) not in done:
            todo.append({"model": model, "calibration": "-", "track": "dense", "recipe": "dense", "sparsity": 0.0})
        for sparsity in args.sparsities:
            for calibration in args.calibrations:
                for track in args.tracks:
                    if track == "params" and sparsity not in MODELS[model].get("params", {}):
                        continue  # no equal-parameter mixes worked out for this model and fraction
                    for recipe in RECIPES[track]:
                        spec = dict(model=model, calibration=calibration, track=track, recipe=recipe, sparsity=sparsity)
                        if (args.recipes is None or recipe in args.recipes) and tuple(spec.values()) not in done:
                            todo.append(spec)
    print(f"{len(todo)} rows to run; log: {log}", flush=True)
    with tempfile.TemporaryDirectory(prefix="matrix-") as work:
        for spec in todo:
            estimate = 1.0 if spec["track"] == "dense" else estimate_minutes(spec, load_rows())
            elapsed = (time.monotonic() - started) / 60
            label = " ".join(str(v) for v in spec.values())
            if args.dry_run or elapsed + estimate > args.max_minutes:
                print(f"  {'would run' if args.dry_run else 'skipped (time)'}: {label} (~{estimate:.0f} min)")
                continue
            print(f"  running: {label} (~{estimate:.0f} min)", flush=True)
            try:
                zeroshot = spec["recipe"] in args.social_iqa
                if spec["track"] == "dense":
                    row = dense_row(spec["model"], log, zeroshot)
                else:
                    row = run_row(spec, Path(work), log, zeroshot)
            except RuntimeError as exc:
                print(f"  FAILED: {label}: {exc}", flush=True)
                continue
            append_row(row)
            if args.keep is not None and spec["track"] != "dense":
                kept = args.keep / "-".join(str(v) for v in spec.values())
                shutil.rmtree(kept, ignore_errors=True)
                shutil.move(str(Path(work) / "pruned"), kept)
            print(
                f"  done: {label}: ppl {row['ppl_2048']:.2f} ({(time.monotonic() - started) / 60:.0f} min)", flush=True
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
