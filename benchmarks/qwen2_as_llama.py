"""Is a Qwen2 converted as LLaMA the same model to llama.cpp? spap exports a heads-pruned Qwen2 that way
(llama.cpp's Qwen2 graph needs heads x head_dim == hidden). The dense model is converted both ways
and llama.cpp's perplexities compared on the same windows; the row goes to results/llamacpp-relabel.json.

    python benchmarks/qwen2_as_llama.py --dense ~/.cache/spap/models/qwen2.5-coder-0.5b.gguf --chunks 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import llamacpp  # benchmarks/llamacpp.py: builds llama.cpp, runs its perplexity
from common import machine, pin_gguf_float32

from spap.io.models import resolve_model

RESULTS = Path(__file__).resolve().parent.parent / "results" / "llamacpp-relabel.json"


def llama_view(checkpoint: Path, into: Path) -> Path:
    """Links to ``checkpoint``'s files with a config that names LLaMA instead of Qwen2."""
    into.mkdir(parents=True, exist_ok=True)
    for item in checkpoint.iterdir():
        if item.name != "config.json":
            (into / item.name).symlink_to(item.resolve())
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model_type"] == "qwen2", "a Qwen2 checkpoint is needed"
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (into / "config.json").write_text(json.dumps(config, indent=2))
    return into


def main() -> None:
    pin_gguf_float32()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", required=True, help="a Qwen2 checkpoint (directory or spap model name)")
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--outtype", default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "spap-llamacpp")
    args = parser.parse_args()
    bin_dir = llamacpp.build()
    checkpoint = Path(resolve_model(args.dense))
    args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spap-as-llama-") as tmp:
        files = {
            "qwen2": llamacpp.export(str(checkpoint), args.work / f"relabel-qwen2-{args.outtype}.gguf", args.outtype),
            "llama": llamacpp.export(
                str(llama_view(checkpoint, Path(tmp) / "view")),
                args.work / f"relabel-llama-{args.outtype}.gguf",
                args.outtype,
            ),
        }
    text = llamacpp.as_spap_reads(llamacpp.TEST, args.work)
    ppl = {arch: llamacpp.llama_perplexity(bin_dir, f, text, args.chunks, args.threads) for arch, f in files.items()}
    row = {
        "model": Path(args.dense).name,
        "outtype": args.outtype,
        "ppl_as_qwen2": ppl["qwen2"],
        "ppl_as_llama": ppl["llama"],
        "ratio": round(ppl["llama"] / ppl["qwen2"], 6),
        "windows": args.chunks,
        "ctx": llamacpp.CTX,
        "llama_cpp_python": llamacpp.LLAMA_CPP_PYTHON,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(row))
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    RESULTS.write_text(
        json.dumps({"meta": {"script": "benchmarks/qwen2_as_llama.py"}, "rows": [*rows, row]}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
