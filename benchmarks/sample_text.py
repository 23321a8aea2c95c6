"""Sample text from the dense model itself: (n, seq_len) token ids (.pt) and the decoded text (.txt).

The model's own samples cover what it knows, not one domain, so they make an evaluation text that
no calibration file shares (layer_swap.py --ppl-file) and, since the labels are the model's own
samples, a true-Fisher estimate (layer_swap.py --fisher-ids).  Temperature 1, weights in --dtype
(spap.io.calibration.self_generated; results/samples/smollm2-8x2048 predates it: it was drawn under
autocast, and a re-run now draws other tokens).  --device and --dtype resolve as `spap prune`'s
--device and --compute-dtype (auto: the GPU where there is one; bf16 on a GPU or a CPU with bf16
instructions, else float32), so with --batch-size 32 and --seed 0 the file equals (checked on a bf16
CPU) what `spap prune --calib self` generates on the same machine, and `--calib FILE.pt` reuses it
across runs.  GPU samples are other tokens than CPU ones.

    python benchmarks/sample_text.py --n 8 --seq-len 2048 --out results/samples/smollm2-8x2048
    python benchmarks/sample_text.py --n 128 --seq-len 2048 --seed 0 --batch-size 32 --out /tmp/self-128x2048
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from spap.io.calibration import self_generated
from spap.io.models import load_model
from spap.runtime.device import resolve_device, resolve_dtype


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: embedded SmolLM2-135M)")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="sequences generated together (default: all n); 32 with --seed 0 reproduces "
        "`spap prune --calib self` token for token",
    )
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    ap.add_argument(
        "--dtype",
        default="auto",
        help="weights while sampling, as spap prune's --compute-dtype: auto, bfloat16, float32, ...",
    )
    ap.add_argument("--out", required=True, help="path prefix: writes PREFIX.pt and PREFIX.txt")
    args = ap.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tok, _ = load_model(args.model)
    t0 = time.perf_counter()
    batch_size = args.batch_size or args.n
    ids = self_generated(model, tok, args.n, args.seq_len, args.seed, batch_size=batch_size, dtype=dtype, device=device)
    print(f"sampled {tuple(ids.shape)} tokens on {device} ({dtype}) in {time.perf_counter() - t0:.0f}s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ids, out.with_suffix(".pt"))
    out.with_suffix(".txt").write_text("\n\n".join(tok.decode(row, skip_special_tokens=True) for row in ids))


if __name__ == "__main__":
    main()
