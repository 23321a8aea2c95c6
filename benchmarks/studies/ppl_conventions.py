"""One model's WikiText-2 perplexity under the text and scoring conventions in use: why numbers differ.

Published perplexities differ in how the test file becomes text and which predictions count.
This evaluates one model (default: the embedded SmolLM2, dense) under each convention, with the
same windows of seq_len tokens (stride = seq_len), and writes a JSON of the rows:

* ``spap``: non-empty lines joined with "\\n\\n" (spap's loader, as ../shared/data/README.md says);
* ``spap-second-half``: the same text, only predictions with at least seq_len / 2 tokens of
  context scored (llama.cpp's ``perplexity`` tool);
* ``raw-crlf``: the file's bytes as they are (CRLF line ends);
* ``text-mode``: the file read in Python's text mode (``open(path).read()``: "\\n" line ends).

    python benchmarks/studies/ppl_conventions.py --ppl-file ../shared/data/wikitext-2-raw/wiki.test.raw \\
        --out results/ppl-conventions-smollm2.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common
from common import machine, markdown_table, save_rows  # noqa: E402

from spap.evaluation.perplexity import perplexity
from spap.io.calibration import load_text
from spap.io.models import load_model
from spap.runtime.device import versions

# name -> (how the file becomes text, score_from as a fraction of seq_len)
CONVENTIONS: dict[str, tuple[Callable[[Path], str], float]] = {
    "spap": (lambda p: load_text(str(p)), 0.0),
    "spap-second-half": (lambda p: load_text(str(p)), 0.5),
    "raw-crlf": (lambda p: p.read_bytes().decode("utf-8"), 0.0),
    "text-mode": (lambda p: p.read_text(encoding="utf-8"), 0.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint dir or .gguf (default: embedded SmolLM2-135M)")
    ap.add_argument("--ppl-file", type=Path, required=True)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16", help="matmul dtype of the evaluation (autocast)")
    ap.add_argument("--max-windows", type=int, default=None, help="default: the whole file")
    ap.add_argument("--conventions", nargs="+", default=list(CONVENTIONS), choices=list(CONVENTIONS))
    ap.add_argument("--out", type=Path, required=True, help="JSON of the rows")
    args = ap.parse_args()
    model, tok, path = load_model(args.model)
    meta = {
        "model": path,
        "ppl_file": str(args.ppl_file),
        "seq_len": args.seq_len,
        "dtype": args.dtype,
        "max_windows": args.max_windows,
        "machine": machine(),
        "versions": versions(),
    }
    rows = []
    for name in args.conventions:
        to_text, fraction = CONVENTIONS[name]
        t0 = time.perf_counter()
        r = perplexity(
            model,
            tok,
            to_text(args.ppl_file),
            args.seq_len,
            dtype=getattr(torch, args.dtype),
            max_windows=args.max_windows,
            score_from=int(fraction * args.seq_len),
        )
        rows.append({"convention": name, **r.to_dict(), "seconds": round(time.perf_counter() - t0, 1)})
        print(
            f"{name}: ppl@{args.seq_len} {r.perplexity:.3f} ({r.n_windows} windows, "
            f"{r.n_predicted_tokens} scored tokens)",
            flush=True,
        )
        save_rows(args.out, rows, meta)
    print(
        markdown_table(
            ["convention", f"ppl@{args.seq_len}", "windows", "scored tokens"],
            [[r["convention"], r["perplexity"], r["n_windows"], r["n_predicted_tokens"]] for r in rows],
        )
    )


if __name__ == "__main__":
    main()
