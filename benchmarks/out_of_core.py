"""Peak host memory of ``spap prune`` in memory and out of core (``--offload never`` / ``always``).

Each run is ``spap prune`` in a fresh process; its peak RSS is that process's ru_maxrss. Both modes'
checkpoints are compared tensor by tensor (``identical``: the same kept neurons and weights).

    # depth: synthetic LLaMA checkpoints (random bf16 weights) of 8, 16 and 32 layers, one width
    python benchmarks/out_of_core.py --depths 8 16 32
    # a real checkpoint directory (bf16 safetensors), the default recipe, WikiText-2 calibration
    python benchmarks/out_of_core.py --model /path/to/qwen2.5-coder-1.5b \\
        --calib ../shared/data/wikitext-2/wiki.valid.tokens --n-samples 4 --seq-len 1024
    # spap eval in memory and streamed (first 4 windows of 2048 tokens), no pruning
    python benchmarks/out_of_core.py --model DIR --skip-prune \
        --eval-text ../shared/data/wikitext-2-raw/wiki.test.raw --eval-windows 4

Appends rows ``{"model", "mode", "layers", "peak_rss_gib", "predicted_gib", "seconds", "identical",
"tokens", "recipe", "machine", "command"}`` to results/out-of-core.json (a rerun replaces its row) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import load_rows, machine, markdown_table, run_isolated, save_rows  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "results" / "out-of-core.json"
SYNTHETIC = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_key_value_heads=4)


def synthetic_checkpoint(directory: Path, layers: int, shape: dict[str, int], seed: int = 0) -> Path:
    """A random LLaMA of ``layers`` decoder layers and ``shape`` saved in bf16 with a tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from spap.io.models import load_model

    _, tokenizer, _ = load_model(None)  # the embedded default's tokenizer (offline)
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, num_hidden_layers=layers, vocab_size=len(tokenizer), tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def prune_job(job: dict[str, Any]) -> dict[str, Any]:
    """``spap prune`` in this (fresh) process; its wall time and peak RSS."""
    import time

    from spap.cli import main
    from spap.runtime.device import peak_rss_gib

    started = time.perf_counter()
    code = main(job["argv"])
    if code != 0:
        raise RuntimeError(f"spap {shlex.join(job['argv'])} exited with {code}")
    return {"peak_rss_gib": peak_rss_gib(), "seconds": time.perf_counter() - started}


def eval_job(job: dict[str, Any]) -> dict[str, Any]:
    """``spap eval`` in this (fresh) process: wall time, peak RSS and the perplexity it wrote."""
    import json

    measured = prune_job(job)  # same harness: main(argv), then ru_maxrss
    written = json.loads((Path(job["model"]) / "eval.json").read_text())["perplexity"][job["text"]]
    return {**measured, "perplexity": written["perplexity"], "windows": written["n_windows"]}


def eval_rows(model: Path, name: str, text: str, seq_len: int, windows: int) -> list[dict[str, Any]]:
    """Peak RSS of ``spap eval`` in memory and streamed, on the first ``windows`` windows of ``text``."""
    rows = []
    for mode in ("never", "always"):
        argv = ["eval", str(model), "--ppl", text, "--seq-len", str(seq_len), "--max-windows", str(windows)]
        argv += ["--offload", mode]
        print(f"spap {shlex.join(argv)}", flush=True)
        measured = run_isolated({"argv": argv, "model": str(model), "text": text}, eval_job)
        row = {"model": name, "mode": "eval in memory" if mode == "never" else "eval streamed", "layers": None}
        row.update(
            measured, tokens=windows * seq_len, recipe="-", machine=machine(), command=f"spap {shlex.join(argv)}"
        )
        rows.append(row)
    identical = abs(rows[0]["perplexity"] - rows[1]["perplexity"]) <= 1e-6 * rows[0]["perplexity"]
    for row in rows:
        row["identical"] = identical
    return rows


def same_checkpoint(a: Path, b: Path) -> bool:
    """Every tensor of the two checkpoints equal (names, dtypes and values)."""
    import torch

    from spap.io.shards import SafetensorsCheckpoint

    ca, cb = SafetensorsCheckpoint(a), SafetensorsCheckpoint(b)
    if ca.names() != cb.names():
        return False
    for name in sorted(ca.names()):
        ta, tb = ca.read([name])[name], cb.read([name])[name]
        if ta.dtype != tb.dtype or not torch.equal(ta, tb):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a checkpoint directory (default: synthetic checkpoints)")
    ap.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32], help="layers of the synthetic checkpoints")
    ap.add_argument("--hidden-size", type=int, default=SYNTHETIC["hidden_size"])
    ap.add_argument("--intermediate-size", type=int, default=SYNTHETIC["intermediate_size"])
    ap.add_argument("--modes", nargs="+", default=["never", "always"], choices=["never", "always"])
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--calib", default="bundled")
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-text", default=None, help="also measure spap eval (in memory, streamed) on this text")
    ap.add_argument("--eval-seq-len", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--skip-prune", action="store_true", help="only the spap eval rows")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--extra", default="", help="more spap prune flags, e.g. '--method cfsp'")
    ap.add_argument("--work", default=None, help="where checkpoints are written (default: a temporary directory)")
    args = ap.parse_args()

    shape = dict(SYNTHETIC, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size)
    work = Path(args.work or tempfile.mkdtemp(prefix="spap-out-of-core-"))
    work.mkdir(parents=True, exist_ok=True)
    width = f"{args.hidden_size}-{args.intermediate_size}"
    sources = [(Path(args.model), None)] if args.model else [(work / f"synthetic-{width}x{n}", n) for n in args.depths]
    rows = load_rows(Path(args.results))
    new = []
    for source, layers in sources:
        if layers is not None and not (source / "config.json").is_file():
            run_isolated({"dir": str(source), "layers": layers, "shape": shape}, _make_synthetic)
        name = source.name if layers is None else f"synthetic-llama-{width}x{layers}"
        if args.eval_text:
            new += eval_rows(source, name, args.eval_text, args.eval_seq_len, args.eval_windows)
        outputs = {}
        for mode in [] if args.skip_prune else args.modes:
            out = work / f"{source.name}-pruned-{mode}"
            argv = ["prune", str(source), "--sparsity", str(args.sparsity), "--out", str(out), "--overwrite"]
            argv += ["--calib", args.calib, "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len)]
            argv += ["--offload", mode, *shlex.split(args.extra)]
            print(f"spap {shlex.join(argv)}", flush=True)
            measured = run_isolated({"argv": argv}, prune_job)
            outputs[mode] = out
            row = {"model": name, "mode": "in-memory" if mode == "never" else "offload", "layers": layers}
            row["recipe"] = args.extra or "default"
            row.update(measured, tokens=args.n_samples * args.seq_len, machine=machine())
            predicted = json.loads((out / "pruning.json").read_text()).get("predicted_peak_rss_gib")
            row["predicted_gib"] = predicted  # spap's memory model, printed before the run
            row["command"] = f"spap {shlex.join(argv)}"
            new.append(row)
        if len(outputs) == 2:
            identical = same_checkpoint(outputs["never"], outputs["always"])
            for row in new[-2:]:
                row["identical"] = identical

    def key(row: dict[str, Any]) -> tuple:
        return row["model"], row["mode"], row.get("tokens"), row.get("recipe", "default")

    rows = [r for r in rows if key(r) not in {key(r) for r in new}] + new
    save_rows(Path(args.results), rows, {"script": "benchmarks/out_of_core.py"})
    table = [
        [r["model"], r.get("recipe", "default"), r["mode"], r.get("layers") or "", r["peak_rss_gib"]]
        + [r.get("predicted_gib") or "", r["seconds"]]
        + [r.get("identical", "")]
        for r in rows
    ]
    header = ["model", "recipe", "mode", "layers", "peak RSS GiB", "predicted GiB", "seconds", "identical"]
    print(markdown_table(header, table))


def _make_synthetic(job: dict[str, Any]) -> dict[str, Any]:
    synthetic_checkpoint(Path(job["dir"]), job["layers"], job["shape"])
    return {}


if __name__ == "__main__":
    main()
