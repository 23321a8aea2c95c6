"""Self-generated calibration: tokens per second of spap's sampler against the plain `generate` path.

"autocast + dynamic cache" is how spap sampled before 2026-11-24 (fp32 weights under bf16 autocast,
the cache growing by one token per step); "cast copy + static cache" is ``spap.io.calibration.
self_generated`` now (weights swapped for a bf16 copy, cache allocated once).  Same n, seq_len, batch
size and seed in one process; prints a table and writes JSON.

    python benchmarks/studies/generation_speed.py --n 32 --seq-len 512 --out results/generation-speed-smollm2-cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common
from common import machine  # noqa: E402

from spap.io.calibration import sample_sequences, self_generated, start_token
from spap.io.models import load_model
from spap.runtime.device import autocast_for, resolve_device, resolve_dtype


def autocast_dynamic(model, start: int, n: int, seq_len: int, seed: int, batch_size: int, dtype: torch.dtype):
    """The baseline: the same sampler on the fp32 weights under autocast, with the growing cache."""
    torch.manual_seed(seed)
    with torch.no_grad(), autocast_for(model, dtype):
        return sample_sequences(model, start, n, seq_len, batch_size, torch.device("cpu"), cache_implementation=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: embedded SmolLM2-135M)")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", help="auto (bf16 where the CPU has it), bfloat16, float32")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args()
    model, tok, path = load_model(args.model)
    dtype = resolve_dtype(args.dtype, resolve_device("cpu"))
    start = start_token(tok)
    tokens = args.n * (args.seq_len - 1)
    sampling = (args.n, args.seq_len, args.seed, args.batch_size, dtype)  # shared by both paths
    rows = []
    for name, run in (
        ("autocast + dynamic cache", lambda: autocast_dynamic(model, start, *sampling)),
        ("cast copy + static cache", lambda: self_generated(model, tok, *sampling)),
    ):
        t0 = time.perf_counter()
        ids = run()
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "path": name,
                "seconds": round(seconds, 1),
                "tokens_per_s": round(tokens / seconds, 1),
                "shape": list(ids.shape),
            }
        )
    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(f"| path | seconds | tokens/s |  ({args.n} x {args.seq_len}, batch {args.batch_size}, {dtype}, {machine()})")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['seconds']} | {r['tokens_per_s']} |")
    print(f"speed-up: {ratio:.2f}x")
    if args.out:
        meta = {
            "model": str(path),
            "n": args.n,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "dtype": str(dtype),
            "machine": machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        Path(args.out).write_text(json.dumps({**meta, "rows": rows, "speedup": round(ratio, 2)}, indent=2))


if __name__ == "__main__":
    main()
