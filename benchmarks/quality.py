"""Quality sweep: WikiText-2 perplexity of every method at several sparsities, one harness.

    python benchmarks/quality.py --ppl-file ../shared/data/wikitext-2-raw/wiki.test.raw \
        --sparsities 0.1 0.2 0.3 0.4 0.5 --methods spap magnitude wanda-sp fasp flap cfsp

Each (method, sparsity) runs in a fresh process (its own peak memory).  Writes
results/quality-<model>.json (appended run by run; --resume skips finished rows), a Markdown table
and a PNG plot of perplexity against sparsity.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import (  # noqa: E402
    VARIANTS,
    headless_pyplot,
    load_rows,
    machine,
    markdown_table,
    pin_gguf_float32,
    run_isolated,
    save_rows,
)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--name", default=None, help="results file tag (default: model name)")
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["spap", "magnitude", "wanda-sp", "fasp", "flap", "cfsp"],
        choices=list(VARIANTS),
    )
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    ap.add_argument("--calib", default="bundled")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--ppl-file", required=True)
    ap.add_argument("--seq-lens", type=int, nargs="*", default=[2048, 128])
    ap.add_argument("--max-tokens", type=int, default=None, help="evaluate on the first N tokens only")
    ap.add_argument("--eval-dtype", default="bfloat16")
    ap.add_argument("--tasks", nargs="*", default=[], help="zero-shot task files evaluated too")
    ap.add_argument("--task-limit", type=int, default=None)
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="PruneConfig overrides, e.g. temperature=0.5"
    )
    ap.add_argument("--solver-set", nargs="*", default=[], metavar="KEY=VALUE", help="SolverConfig overrides")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="results")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--save-dir", default=None, help="also save each pruned model to DIR/<method>-<sparsity>")
    return ap.parse_args()


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def pivot_table(rows: list[dict], seq_len: int) -> str:
    """Methods x sparsities, perplexity at ``seq_len``; "-" where not run."""
    sparsities = sorted({r["sparsity"] for r in rows if r["variant"] != "dense"})
    methods = sorted({r["variant"] for r in rows if r["variant"] != "dense"})
    cell = {(r["variant"], r["sparsity"]): r["ppl"].get(str(seq_len), {}).get("perplexity") for r in rows}
    body = [[m, *[cell.get((m, s)) or "-" for s in sparsities]] for m in methods]
    dense = f"dense: {cell[('dense', 0.0)]:.2f}\n\n" if ("dense", 0.0) in cell else ""
    return dense + markdown_table(["method", *[f"{s:.0%}" for s in sparsities]], body)


def write_outputs(rows: list[dict], out: Path, seq_lens: list[int], title: str) -> str:
    tasks = sorted({t for r in rows for t in r.get("zeroshot", {})})
    header = (
        ["method", "sparsity", "params (M)"]
        + [f"ppl@{s}" for s in seq_lens]
        + [f"{t} {m}" for t in tasks for m in ("acc", "acc_norm")]
        + ["prune s", "peak RSS GiB"]
    )
    machines = any("machine" in r for r in rows)  # rows of one file may come from different machines
    header += ["machine"] if machines else []
    table_rows = []
    for r in sorted(rows, key=lambda r: (r["sparsity"], r["variant"])):
        zs = r.get("zeroshot", {})
        table_rows.append(
            [r["variant"], f"{r['sparsity']:.0%}", f"{r['parameters'] / 1e6:.1f}"]
            + [r["ppl"][str(s)]["perplexity"] if str(s) in r["ppl"] else "" for s in seq_lens]
            + [f"{zs[t][m]:.4f}" if t in zs else "" for t in tasks for m in ("acc", "acc_norm")]
            + [round(r.get("prune_seconds", 0)), f"{r.get('peak_rss_gib', 0):.1f}" if "peak_rss_gib" in r else ""]
            + ([r.get("machine", "-")] if machines else [])
        )
    table = markdown_table(header, table_rows)
    pivots = "\n\n".join(f"## ppl@{s} by sparsity\n\n{pivot_table(rows, s)}" for s in seq_lens)
    out.with_suffix(".md").write_text(f"# {title}\n\n{table}\n\n{pivots}\n")
    plt = headless_pyplot()
    if plt is None or not seq_lens:
        return table
    fig, axes = plt.subplots(1, len(seq_lens), figsize=(6 * len(seq_lens), 4.5), squeeze=False)
    dense = {s: [r for r in rows if r["variant"] == "dense"] for s in seq_lens}
    for ax, s in zip(axes[0], seq_lens):
        for method in sorted({r["variant"] for r in rows if r["variant"] != "dense"}):
            pts = sorted((r["sparsity"], r["ppl"][str(s)]["perplexity"]) for r in rows if r["variant"] == method)
            if dense[s]:
                pts = [(0.0, dense[s][0]["ppl"][str(s)]["perplexity"])] + pts
            top = 30 * dense[s][0]["ppl"][str(s)]["perplexity"] if dense[s] else float("inf")
            label = method + (" (off scale)" if any(p[1] > top for p in pts) else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_yscale("log")
        if dense[s]:  # a collapsed method (e.g. magnitude) would flatten every other curve
            ax.set_ylim(0.8 * dense[s][0]["ppl"][str(s)]["perplexity"], 30 * dense[s][0]["ppl"][str(s)]["perplexity"])
        ax.set_xlabel("MLP sparsity")
        ax.set_ylabel(f"perplexity (seq_len {s})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    return table


def plan_jobs(methods: list[str], sparsities: list[float]) -> list[tuple[str, float]]:
    """(variant, sparsity) in run order: dense once at sparsity 0 (named in ``methods`` or not), then each
    method at each sparsity."""
    return [("dense", 0.0)] + [(m, s) for s in sparsities for m in methods if m != "dense"]


def main() -> None:
    pin_gguf_float32()
    args = parse()
    tag = args.name or Path(args.model).name
    out = Path(args.out_dir) / f"quality-{tag}.json"
    rows = load_rows(out) if args.resume else []
    meta = {
        "model": args.model,
        "machine": machine(),
        "ppl_file": args.ppl_file,
        "seq_lens": args.seq_lens,
        "max_tokens": args.max_tokens,
        "eval_dtype": args.eval_dtype,
        "calibration": {"source": args.calib, "n_samples": args.n_samples, "seq_len": args.seq_len, "seed": args.seed},
        "command": " ".join(sys.argv),
        "overrides": parse_sets(args.set),
        "solver_overrides": parse_sets(args.solver_set),
    }
    for variant, sparsity in plan_jobs(args.methods, args.sparsities):
        if any(r["variant"] == variant and r["sparsity"] == sparsity for r in rows):
            continue
        job = {
            "model": args.model,
            "variant": variant,
            "sparsity": sparsity,
            "seed": args.seed,
            "calibration": meta["calibration"],
            "ppl_file": args.ppl_file,
            "seq_lens": args.seq_lens,
            "max_tokens": args.max_tokens,
            "eval_dtype": args.eval_dtype,
            "tasks": args.tasks,
            "task_limit": args.task_limit,
            "overrides": parse_sets(args.set),
            "solver": parse_sets(args.solver_set),
        }
        if args.save_dir and variant != "dense":
            job["save"] = str(Path(args.save_dir) / f"{variant}-{sparsity:g}")
        row = run_isolated(job)
        rows.append(row)
        save_rows(out, rows, meta)
        ppl = ", ".join(f"ppl@{k} {v['perplexity']:.2f}" for k, v in row["ppl"].items())
        print(f"{variant:18s} {sparsity:4.0%}  {ppl}  prune {row.get('prune_seconds', 0):.0f}s", flush=True)
    print(write_outputs(rows, out, args.seq_lens, f"{tag}: perplexity vs MLP sparsity"))


if __name__ == "__main__":
    main()
