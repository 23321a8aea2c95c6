"""Speed and memory of dense vs pruned models at several MLP sparsities, measured in one run.

Speed depends only on shapes, so pruned models are made by keeping the first (1 - s) * m neurons
of every MLP (and, with --heads, dropping KV groups, or query heads inside every KV group with
--head-unit query); no calibration needed.

    python benchmarks/speed.py                          # SmolLM2-135M on this machine
    python benchmarks/speed.py --shape llama3-8b        # LLaMA-3.1-8B shapes, random weights (GPU)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import SHAPES, machine, markdown_table, shape_model  # noqa: E402

from spap.core import allocation  # noqa: E402


def build(shape: str | None, model: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    if shape:
        return shape_model(shape, dtype, device)
    from spap.models import load_model

    return load_model(model, dtype=str(dtype).replace("torch.", ""), device=device)[0]


def kept_width(width: int, sparsity: float, multiple: int) -> int:
    """(1 - sparsity) * width rounded to a multiple, as ``spap prune --width-multiple`` keeps it under
    uniform allocation (GEMM tiles: odd widths run far slower on GPUs)."""
    return width - allocation.uniform([width], sparsity, multiple)[0]


def shrink(
    model: torch.nn.Module, sparsity: float, head_fraction: float = 0.0, multiple: int = 1, head_unit: str = "kv-group"
) -> torch.nn.Module:
    from spap.adapters import get_adapter
    from spap.core.heads import column_groups, query_head_columns
    from spap.layer_heads import heads_to_prune

    pruned = copy.deepcopy(model)
    adapter = get_adapter(pruned)
    for layer in adapter.decoder_layers(pruned):
        w = adapter.read_mlp(layer)
        keep = kept_width(w.width, sparsity, multiple)
        adapter.write_mlp(layer, w.select(torch.arange(keep)))
        if head_fraction:
            n_heads, n_kv, head_dim = adapter.attention_shape(layer)
            n_prune = heads_to_prune(head_unit, head_fraction, n_heads, n_kv)
            if head_unit == "query":  # the first heads of every KV group stay
                per_group = n_heads // n_kv
                keep = [h for h in range(n_heads) if h % per_group < per_group - n_prune]
                unit_of_column, apply = query_head_columns(n_heads, head_dim), adapter.keep_query_heads
            else:
                keep = list(range(n_kv - n_prune))
                unit_of_column, apply = column_groups(n_heads, n_kv, head_dim), adapter.keep_kv_groups
            columns = torch.isin(unit_of_column, torch.tensor(keep)).nonzero().flatten()
            o = adapter.attention_output_linear(layer)
            apply(layer, keep, o.weight.detach()[:, columns], o.bias)
    if head_fraction:  # the static KV cache is sized from the config
        n_heads, n_kv, head_dim = adapter.attention_shape(adapter.decoder_layers(pruned)[0])
        pruned.config.num_attention_heads, pruned.config.num_key_value_heads = n_heads, n_kv
        pruned.config.head_dim = head_dim
    return pruned


def main() -> None:
    from spap.evaluation.speed import compare_results, format_comparison, measure

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--shape", choices=list(SHAPES), default=None)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.3, 0.5])
    ap.add_argument("--heads", type=float, default=0.0, help="also remove this fraction of heads per layer (--head-unit)")
    ap.add_argument("--head-unit", default="kv-group", choices=["kv-group", "query"],
                    help="kv-group: whole KV groups; query: query heads inside every KV group")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prefill-batch", type=int, default=4)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--decode-batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--width-multiple", type=int, default=64, help="round kept MLP widths to this multiple")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    settings = dict(prefill_batch=args.prefill_batch, prefill_len=args.prefill_len,
                    decode_batch=args.decode_batch, new_tokens=args.new_tokens)
    tag = args.shape or Path(args.model).name
    suffix = ("-query-heads" if args.head_unit == "query" else "-heads") if args.heads else ""
    out = Path(args.out or f"results/speed-{tag}-{args.device.split(':')[0]}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    dense_model = build(args.shape, args.model, dtype, args.device)
    dense = measure(dense_model, **settings)  # once: every ratio below shares this denominator
    meta = {"machine": machine(), "device": args.device, "dtype": args.dtype, "settings": settings,
            "width_multiple": args.width_multiple, "torch": torch.__version__, "graphs": args.device.startswith("cuda")}
    results = []
    for s in args.sparsities:
        pruned = shrink(dense_model, s, args.heads, args.width_multiple, args.head_unit)
        c = compare_results(dense, measure(pruned, **settings))
        c.update(sparsity=s, heads=args.heads, head_unit=args.head_unit)
        unit = "query heads per KV group" if args.head_unit == "query" else "KV groups"
        print(f"\n== MLP sparsity {s:.0%}" + (f", {args.heads:.0%} of {unit}" if args.heads else "") + " ==")
        print(format_comparison(c), flush=True)
        results.append(c)
        del pruned
        out.write_text(json.dumps({**meta, "results": results}, indent=2))  # after each row: partial runs keep rows
    rows = [[f"{r['sparsity']:.0%}", r["byte_ratio_limit"], r["prefill_speedup"], r["decode_speedup_batch1"],
             r["decode_speedup_batch1"] / r["byte_ratio_limit"], r["decode_speedup_batched"],
             r["decode_speedup_batched"] / r["byte_ratio_limit"], r["weight_memory_ratio"]]
            for r in results]
    print()
    print(markdown_table(["sparsity", "byte limit", "prefill x", "decode x (b=1)", "b=1 / limit",
                          f"decode x (b={args.decode_batch})", f"b={args.decode_batch} / limit", "weight mem ratio"], rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
