"""Speed and memory of dense vs pruned models at several MLP sparsities, measured in one run.

Speed depends only on shapes, so pruned models are made by keeping the first (1 - s) * m neurons
of every MLP (and, with --heads, dropping KV groups, or query heads inside every KV group with
--head-unit query); no calibration needed.

    python benchmarks/speed.py                          # SmolLM2-135M on this machine
    python benchmarks/speed.py --shape llama3-8b        # LLaMA-3.1-8B shapes, random weights (GPU)
    python benchmarks/speed.py --shape llama3-8b --combos 0.2 0.3 0.5 0.3:0.25 \
        --width-multiples 64 128 256 512                # the GPU table: every row in one process

A combo is MLP_SPARSITY[:HEAD_FRACTION]; each is measured at every width multiple.  Rows report the
decode byte-ratio limit and the prefill FLOP ratio (dense / pruned forward FLOPs at the prefill
shape) beside the measured speed-ups.
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
    from spap.io.models import load_model

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
    from spap.pruning.heads import heads_to_prune

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


def forward_flops(model: torch.nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token at ``seq_len``: 2 x the decoder layers' Linear weights + lm_head, plus
    causal attention 2 x seq_len x head_dim per query head per layer."""
    from spap.adapters import get_adapter

    adapter = get_adapter(model)
    total = 2.0 * model.get_output_embeddings().weight.numel()
    for layer in adapter.decoder_layers(model):
        n_heads, _, head_dim = adapter.attention_shape(layer)
        linear = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
        total += 2 * linear + 2 * seq_len * head_dim * n_heads
    return total


def parse_combo(text: str) -> tuple[float, float]:
    mlp, _, heads = text.partition(":")
    return float(mlp), float(heads or 0.0)


def main() -> None:
    from spap.evaluation.speed import compare_results, format_comparison, measure

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--shape", choices=list(SHAPES), default=None)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.3, 0.5])
    ap.add_argument(
        "--heads", type=float, default=0.0, help="also remove this fraction of heads per layer (--head-unit)"
    )
    ap.add_argument(
        "--combos",
        nargs="+",
        default=None,
        metavar="MLP[:HEADS]",
        help="rows as MLP sparsity[:head fraction] (overrides --sparsities/--heads), e.g. 0.3 0.3:0.25",
    )
    ap.add_argument(
        "--head-unit",
        default="kv-group",
        choices=["kv-group", "query"],
        help="kv-group: whole KV groups; query: query heads inside every KV group",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prefill-batch", type=int, default=4)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--decode-batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument(
        "--width-multiples", type=int, nargs="+", default=[64], help="round kept MLP widths to these multiples"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    settings = dict(
        prefill_batch=args.prefill_batch,
        prefill_len=args.prefill_len,
        decode_batch=args.decode_batch,
        new_tokens=args.new_tokens,
    )
    combos = [parse_combo(c) for c in args.combos] if args.combos else [(s, args.heads) for s in args.sparsities]
    tag = args.shape or Path(args.model).name
    suffix = ("-query-heads" if args.head_unit == "query" else "-heads") if any(h for _, h in combos) else ""
    out = Path(args.out or f"results/speed-{tag}-{args.device.split(':')[0]}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    dense_model = build(args.shape, args.model, dtype, args.device)
    dense = measure(dense_model, **settings)  # once: every ratio below shares this denominator
    dense_flops = forward_flops(dense_model, args.prefill_len)
    meta = {
        "machine": machine(),
        "device": args.device,
        "dtype": args.dtype,
        "settings": settings,
        "width_multiples": args.width_multiples,
        "torch": torch.__version__,
        "graphs": args.device.startswith("cuda"),
    }
    results = []
    for s, heads in combos:
        for multiple in args.width_multiples:
            pruned = shrink(dense_model, s, heads, multiple, args.head_unit)
            c = compare_results(dense, measure(pruned, **settings))
            c.update(
                sparsity=s,
                heads=heads,
                head_unit=args.head_unit,
                width_multiple=multiple,
                prefill_flop_ratio=dense_flops / forward_flops(pruned, args.prefill_len),
            )
            unit = "query heads per KV group" if args.head_unit == "query" else "KV groups"
            print(
                f"\n== MLP sparsity {s:.0%}, width multiple {multiple}"
                + (f", {heads:.0%} of {unit}" if heads else "")
                + " =="
            )
            print(format_comparison(c), flush=True)
            results.append(c)
            del pruned
            out.write_text(json.dumps({**meta, "results": results}, indent=2))  # after each row: partial runs keep rows
    rows = [
        [
            f"{r['sparsity']:.0%}",
            f"{r['heads']:.0%}",
            r["width_multiple"],
            r["byte_ratio_limit"],
            r["decode_speedup_batch1"],
            r["decode_speedup_batch1"] / r["byte_ratio_limit"],
            r["decode_speedup_batched"],
            r["decode_speedup_batched"] / r["byte_ratio_limit"],
            r["prefill_flop_ratio"],
            r["prefill_speedup"],
            r["prefill_speedup"] / r["prefill_flop_ratio"],
            r["weight_memory_ratio"],
        ]
        for r in results
    ]
    print()
    print(
        markdown_table(
            [
                "MLP",
                "heads",
                "multiple",
                "byte limit",
                "decode x (b=1)",
                "b=1 / limit",
                f"decode x (b={args.decode_batch})",
                f"b={args.decode_batch} / limit",
                "FLOP ratio",
                "prefill x",
                "prefill / FLOP",
                "weight mem ratio",
            ],
            rows,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
