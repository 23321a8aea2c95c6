"""Speed and memory of dense vs pruned models at several MLP sparsities, measured in one run.

Speed depends only on shapes, so pruned models are made by keeping the first (1 - s) * m neurons
of every MLP (and, with --heads, dropping KV groups); no calibration needed.

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

from common import machine, markdown_table  # noqa: E402

SHAPES = {  # public config values of the named models (random weights)
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "llama3-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=True),
}


def build(shape: str | None, model: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    if shape:
        from transformers import AutoModelForCausalLM, LlamaConfig

        with torch.device(device):
            m = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]), dtype=dtype)
        return m.eval()
    from spap.models import load_model

    return load_model(model, dtype=str(dtype).replace("torch.", ""), device=device)[0]


def shrink(model: torch.nn.Module, sparsity: float, head_fraction: float = 0.0) -> torch.nn.Module:
    from spap.adapters import get_adapter
    from spap.core.heads import column_groups

    pruned = copy.deepcopy(model)
    adapter = get_adapter(pruned)
    for layer in adapter.decoder_layers(pruned):
        w = adapter.read_mlp(layer)
        keep = w.width - int(round(sparsity * w.width))
        adapter.write_mlp(layer, w.select(torch.arange(keep)))
        if head_fraction:
            n_heads, n_kv, head_dim = adapter.attention_shape(layer)
            keep = list(range(n_kv - int(round(head_fraction * n_kv))))
            columns = torch.isin(column_groups(n_heads, n_kv, head_dim), torch.tensor(keep)).nonzero().flatten()
            o = adapter.attention_output_linear(layer)
            adapter.keep_kv_groups(layer, keep, o.weight.detach()[:, columns], o.bias)
    if head_fraction:  # the static KV cache is sized from the config
        n_heads, n_kv, head_dim = adapter.attention_shape(adapter.decoder_layers(pruned)[0])
        pruned.config.num_attention_heads, pruned.config.num_key_value_heads = n_heads, n_kv
        pruned.config.head_dim = head_dim
    return pruned


def main() -> None:
    from spap.evaluation.speed import compare, format_comparison

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--shape", choices=list(SHAPES), default=None)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.3, 0.5])
    ap.add_argument("--heads", type=float, default=0.0, help="also remove this fraction of KV groups per layer")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prefill-batch", type=int, default=4)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--decode-batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    dense = build(args.shape, args.model, dtype, args.device)
    results = []
    for s in args.sparsities:
        pruned = shrink(dense, s, args.heads)
        c = compare(dense, pruned, prefill_batch=args.prefill_batch, prefill_len=args.prefill_len,
                    decode_batch=args.decode_batch, new_tokens=args.new_tokens)
        c.update(sparsity=s, heads=args.heads)
        print(f"\n== MLP sparsity {s:.0%}" + (f", {args.heads:.0%} of KV groups" if args.heads else "") + " ==")
        print(format_comparison(c))
        results.append(c)
        del pruned
    rows = [[f"{r['sparsity']:.0%}", r["byte_ratio_limit"], r["prefill_speedup"], r["decode_speedup_batch1"],
             r["decode_speedup_batched"], r["decode_speedup_batched"] / r["byte_ratio_limit"], r["weight_memory_ratio"]]
            for r in results]
    print()
    print(markdown_table(["sparsity", "byte limit", "prefill x", "decode x (b=1)", f"decode x (b={args.decode_batch})",
                          "batched / limit", "weight mem ratio"], rows))
    tag = args.shape or Path(args.model).name
    out = Path(args.out or f"results/speed-{tag}-{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "device": args.device, "dtype": args.dtype, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
