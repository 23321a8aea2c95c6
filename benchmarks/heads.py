"""MLP-only vs MLP + attention-head pruning at equal parameters removed.

For each head fraction h and each MLP-only sparsity s in --sparsities, the MLP sparsity s' of the
combined run is chosen so both remove the same number of parameters (per layer, from the model's
own shapes):
    s' * P_mlp = s * P_mlp - h * P_heads
with h = (KV groups removed) / n_kv and P_heads = P_q + P_k + P_v + P_o for --head-unit kv-group,
and h = (query heads removed per group) / (query heads per group) and P_heads = P_q + P_o for
--head-unit query (k/v stay).

    python benchmarks/heads.py --ppl-file ../shared/data/wikitext-2-raw/wiki.test.raw
    python benchmarks/heads.py --head-unit query --ppl-file ../shared/data/wikitext-2-raw/wiki.test.raw
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import VARIANTS, headless_pyplot, load_rows, machine, markdown_table, run_isolated, save_rows  # noqa: E402


def layer_shapes(model_name: str) -> dict[str, int]:
    """Parameter counts of one decoder layer's MLP, attention and q+o projections, and its head counts."""
    from spap.adapters import get_adapter
    from spap.io.models import load_model

    model = load_model(model_name)[0]
    adapter = get_adapter(model)
    layer = adapter.decoder_layers(model)[0]
    proj = adapter.attention_projections(layer)
    n_heads, n_kv, _ = adapter.attention_shape(layer)
    return {
        "mlp": sum(lin.weight.numel() for lin in adapter.mlp_linears(layer).values()),
        "attn": sum(lin.weight.numel() for lin in proj.values()),
        "q_o": proj["q"].weight.numel() + proj["o"].weight.numel(),
        "n_kv": n_kv,
        "per_group": n_heads // n_kv,
    }


def head_cut(shapes: dict[str, int], unit: str, removed: int) -> tuple[float, float, str]:
    """(head_sparsity, attention parameters removed per layer, label) for ``removed`` units."""
    if unit == "query":
        h = removed / shapes["per_group"]
        return h, h * shapes["q_o"], f"{removed} of {shapes['per_group']} query heads per KV group"
    h = removed / shapes["n_kv"]
    return h, h * shapes["attn"], f"{removed} of {shapes['n_kv']} KV groups"


def reusable_rows(path: Path, base: dict, variant: str) -> dict[float, dict]:
    """Rows of ``variant`` in a quality.py file whose calibration, eval text and token budget equal ``base``."""
    data = json.loads(path.read_text())
    meta = data["meta"]
    same = all(meta.get(k) == base[k] for k in ("ppl_file", "max_tokens", "calibration"))
    if not same:
        print(f"--reuse {path}: settings differ from this run, nothing reused", flush=True)
        return {}
    return {
        r["sparsity"]: r
        for r in data["rows"]
        if r["variant"] == variant and r.get("config", {}).get("target", "mlp") == "mlp"
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.3, 0.4])
    ap.add_argument(
        "--variant",
        default="spap",
        choices=[v for v in VARIANTS if v != "dense"],
        help="pruning method variant used for both curves",
    )
    ap.add_argument(
        "--head-unit",
        default="kv-group",
        choices=["kv-group", "query"],
        help="remove whole KV groups, or query heads inside every KV group (k/v kept)",
    )
    ap.add_argument(
        "--heads",
        type=int,
        default=1,
        help="units removed per layer in the combined runs: KV groups, or query heads per KV group",
    )
    ap.add_argument("--ppl-file", required=True)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--calib", default="bundled")
    ap.add_argument("--out", default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument(
        "--reuse",
        default=None,
        metavar="QUALITY_JSON",
        help="take MLP-only rows from a quality.py results file measured with the same settings",
    )
    args = ap.parse_args()
    shapes = layer_shapes(args.model)
    p_mlp = shapes["mlp"]
    h, attn_removed, label = head_cut(shapes, args.head_unit, args.heads)
    suffix = "-query" if args.head_unit == "query" else ""
    out = Path(args.out or f"results/heads{suffix}-{Path(args.model).name}.json")
    rows = load_rows(out) if args.resume else []
    meta = {
        "model": args.model,
        "machine": machine(),
        "mlp_params_per_layer": p_mlp,
        "attn_params_per_layer": shapes["attn"],
        "head_unit": args.head_unit,
        "head_fraction": h,
        "heads_removed": label,
        "variant": args.variant,
        "command": " ".join(sys.argv),
    }
    base = {
        "model": args.model,
        "seed": 0,
        "ppl_file": args.ppl_file,
        "seq_lens": [args.seq_len],
        "max_tokens": args.max_tokens,
        "eval_dtype": "bfloat16",
        "calibration": {"source": args.calib, "n_samples": 128, "seq_len": 2048, "seed": 0},
    }
    reusable = reusable_rows(Path(args.reuse), base, args.variant) if args.reuse else {}
    combined = "mlp+heads" if args.head_unit == "kv-group" else "mlp+query-heads"
    jobs = []
    for s in args.sparsities:
        removed = s * p_mlp
        s_comb = (removed - attn_removed) / p_mlp
        jobs.append(("mlp-only", s, {}, removed))
        if s_comb >= 0:
            overrides = {"target": "both", "head_sparsity": h, "head_unit": args.head_unit}
            jobs.append((combined, round(s_comb, 4), overrides, removed))
    for kind, s, overrides, removed in jobs:
        if any(r["kind"] == kind and r["sparsity"] == s for r in rows):
            continue
        if kind == "mlp-only" and s in reusable:
            row = dict(reusable[s], reused_from=args.reuse)
        else:
            row = run_isolated({**base, "variant": args.variant, "sparsity": s, "overrides": overrides})
        row.update(kind=kind, removed_per_layer=removed, removed_fraction=removed / (p_mlp + shapes["attn"]))
        rows.append(row)
        save_rows(out, rows, meta)
        print(
            f"{kind:10s} mlp {s:.3f} removed {removed / 1e6:.3f}M/layer ppl {row['ppl'][str(args.seq_len)]['perplexity']:.2f}",
            flush=True,
        )
    print(write_outputs(rows, out, args.seq_len, label))


def write_outputs(rows: list[dict], out: Path, seq_len: int, heads_removed: str) -> str:
    """Markdown table and PNG: perplexity vs parameters removed, one curve per kind."""
    key = str(seq_len)
    table = [
        [
            r["kind"],
            f"{r['sparsity']:.1%}",
            heads_removed if r["kind"] != "mlp-only" else "0",
            f"{r['removed_fraction']:.1%}",
            f"{1 - r['parameters'] / r['parameters_before']:.1%}",
            r["ppl"][key]["perplexity"],
        ]
        for r in sorted(rows, key=lambda r: (r["removed_per_layer"], r["kind"]))
    ]
    header = [
        "variant",
        "MLP sparsity",
        "heads removed per layer",
        "layer params removed",
        "model params removed",
        f"ppl@{seq_len}",
    ]
    text = markdown_table(header, table)
    out.with_suffix(".md").write_text(text + "\n")
    plt = headless_pyplot()
    if plt is None:
        return text
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for kind in sorted({r["kind"] for r in rows}):
        pts = sorted(
            (1 - r["parameters"] / r["parameters_before"], r["ppl"][key]["perplexity"])
            for r in rows
            if r["kind"] == kind
        )
        ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker="o", label=kind)
    ax.set_yscale("log")
    ax.set_xlabel("model parameters removed (%)")
    ax.set_ylabel(f"perplexity (seq_len {seq_len})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    return text


if __name__ == "__main__":
    main()
