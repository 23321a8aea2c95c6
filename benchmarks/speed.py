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


PARTS = {".mlp": "mlp", ".self_attn": "attention"}
CORE_KERNELS = ("attention", "fmha", "flash", "sdpa", "scaled_dot_product")  # SDPA: reads of the KV cache


def decode_breakdown(model: torch.nn.Module, prompt_len: int = 64, steps: int = 8) -> dict[str, float]:
    """Milliseconds per batch-1 decode step by part, eager (no CUDA graphs), from the profiler: MLPs,
    attention (projections and core), its core kernels alone (KV-cache reads), the output head, and the
    whole step. Device time on CUDA, CPU time elsewhere."""
    from torch.profiler import ProfilerActivity, profile, record_function
    from transformers import StaticCache

    from spap.evaluation.speed import cache_keyword

    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    open_ranges: list = []
    handles = []
    for name, module in model.named_modules():
        label = "lm_head" if name == "lm_head" else next((v for k, v in PARTS.items() if name.endswith(k)), None)
        if label is None:
            continue

        def enter(_module, _args, label=label):
            open_ranges.append(record_function(label))
            open_ranges[-1].__enter__()

        def leave(_module, _args, _out):
            open_ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    config = model.config
    ids = torch.randint(0, config.vocab_size, (1, prompt_len), device=device)
    cache = StaticCache(config=config, max_cache_len=prompt_len + steps + 2)
    kwargs = {cache_keyword(model): cache}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        with torch.no_grad():
            token = model(input_ids=ids, use_cache=True, **kwargs).logits[:, -1:].argmax(-1)
            model(input_ids=token, cache_position=torch.tensor([prompt_len], device=device), use_cache=True, **kwargs)
            with profile(activities=activities) as prof:
                for i in range(steps):
                    position = torch.tensor([prompt_len + 1 + i], device=device)
                    with record_function("step"):
                        out = model(input_ids=token, cache_position=position, use_cache=True, **kwargs)
                        token = out.logits[:, -1:].argmax(-1)
    finally:
        for handle in handles:
            handle.remove()
    attribute = "device_time_total" if cuda else "cpu_time_total"
    totals: dict[str, float] = {"mlp": 0.0, "attention": 0.0, "lm_head": 0.0, "step": 0.0, "attention_core": 0.0}
    for event in prof.key_averages():
        micros = float(getattr(event, attribute, 0.0) or 0.0)
        if event.key in totals:
            totals[event.key] += micros
        elif any(word in event.key.lower() for word in CORE_KERNELS) and (cuda or event.key.startswith("aten::")):
            totals["attention_core"] += micros if cuda else float(event.self_cpu_time_total)
    return {f"{k}_ms": v / 1000 / steps for k, v in totals.items()}


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
    ap.add_argument(
        "--breakdown",
        type=float,
        default=None,
        metavar="MLP",
        help="also profile a batch-1 decode step of the dense model and of this MLP sparsity, by part",
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
    if args.breakdown is not None:
        parts = {"dense": decode_breakdown(dense_model)}
        pruned = shrink(dense_model, args.breakdown, 0.0, args.width_multiples[0], args.head_unit)
        parts[f"mlp {args.breakdown:.0%}, multiple {args.width_multiples[0]}"] = decode_breakdown(pruned)
        del pruned
        print("\ndecode step by part (ms, batch 1, eager):")
        for name, times in parts.items():
            print(f"  {name:28s} " + "  ".join(f"{k[:-3]} {v:.3f}" for k, v in times.items()))
        out.write_text(json.dumps({**meta, "results": results, "decode_breakdown": parts}, indent=2))
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
