"""llama.cpp as the client: spap's checkpoints converted with `spap export --format gguf` and measured in
llama.cpp itself, dense and pruned in one run; rows appended to results/llamacpp.json.

    python benchmarks/llamacpp.py --name smollm2 --dense smollm2 --pruned OUT/stock-30=stock-30 --chunks 16

llama.cpp is built once from the llama-cpp-python source distribution on PyPI (the same release whose
converter `spap export` uses; it vendors llama.cpp) into spap's cache: `llama-perplexity` and
`llama-bench`, CPU, native instructions (minutes on 2 cores). Per checkpoint:
- perplexity on the first ``--chunks`` windows of 2048 tokens of WikiText-2 test in llama.cpp (it
  scores the second half of every window) beside `spap eval --score-from 1024` on the same windows in
  float32 (the text as spap reads it, see ``as_spap_reads``): the GGUF (bf16 by default) must agree
  within 1%;
- prefill (512 tokens) and decode (128 tokens) tokens/s from one `llama-bench` process over every GGUF,
  and the decode byte-ratio limit: the bytes a decode step reads (every tensor but an untied input
  embedding, of which it reads one row) of the dense GGUF over the pruned one's.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import machine, pin_gguf_float32  # noqa: E402

from spap.io.llamacpp import LLAMA_CPP_PYTHON, download_sdist  # noqa: E402
from spap.io.models import cache_root, resolve_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "llamacpp.json"
TEST = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
CTX = 2048
TOOLS = ("llama-perplexity", "llama-bench")


def build(version: str = LLAMA_CPP_PYTHON) -> Path:
    """The bin/ directory of llama.cpp built from llama-cpp-python ``version``'s sdist (cached)."""
    home = cache_root() / f"llama.cpp-build-{version}"
    bin_dir = home / "build" / "bin"
    if all((bin_dir / tool).is_file() for tool in TOOLS):
        return bin_dir
    with tempfile.TemporaryDirectory(prefix="spap-llama-cpp-src-") as tmp:
        with tarfile.open(download_sdist(version, Path(tmp))) as sdist:
            sdist.extractall(tmp, filter="data")
        source = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        shutil.rmtree(home, ignore_errors=True)
        shutil.copytree(source, home, symlinks=True)
    options = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF"]
    options += ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
    subprocess.run(["cmake", "-S", str(home), "-B", str(home / "build"), *options], check=True)
    subprocess.run(["cmake", "--build", str(home / "build"), "-j", "2", "--target", *TOOLS], check=True)
    return bin_dir


def export(checkpoint: str, out: Path, outtype: str) -> Path:
    """``checkpoint`` (a directory or spap's model name) as a GGUF through `spap export`."""
    if not out.is_file():
        command = [sys.executable, "-m", "spap.cli", "export", resolve_model(checkpoint), "--format", "gguf"]
        subprocess.run([*command, "--out", str(out), "--outtype", outtype], check=True)
    return out


def decode_bytes(gguf_file: Path) -> int:
    """Bytes of the tensors a decode step reads: all but the input embedding when the output head is
    a tensor of its own (a tied head reads the embedding matrix whole)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(gguf_file).tensors}
    untied = "output.weight" in tensors
    return sum(n for name, n in tensors.items() if not (untied and name == "token_embd.weight"))


def as_spap_reads(text: Path, work: Path) -> Path:
    """A copy of ``text`` holding exactly the string spap scores (``read_text_file``: LF newlines, and
    for WikiText raw files the usual "\\n\\n".join of the non-blank lines), for llama.cpp, which reads
    bytes: both then tokenise the same text. The copy's name must not look like wiki.*.raw, or spap
    would apply the layout twice."""
    from spap.io.calibration import read_text_file

    copy = work / f"{text.stem}.as-spap-reads.txt"
    copy.write_text(read_text_file(text), encoding="utf-8", newline="\n")
    return copy


def parse_perplexity(output: str, chunks: int) -> float | None:
    """llama-perplexity's estimate over ``chunks`` windows from its output: the "Final estimate" line, or
    else the running estimate printed after the last chunk (the same number), or None when neither
    arrived. llama.cpp logs from a thread it never joins, so its last lines can be lost at exit
    (llama.cpp#22142; seen in CI)."""
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", output)
    if found:
        return float(found.group(1))
    running = re.search(rf"\[{chunks}\]([0-9.]+),", output)
    return float(running.group(1)) if running else None


def llama_perplexity(bin_dir: Path, gguf_file: Path, text: Path, chunks: int, threads: int, ctx: int = CTX) -> float:
    """llama.cpp's perplexity of ``gguf_file`` on the first ``chunks`` windows of ``ctx`` tokens of ``text``
    (it scores the second half of each); run again, up to ten times, when its log lost the estimate (a
    run of a tiny model exits before llama.cpp's logging thread writes its last lines about half the
    time on 2 cores: llama.cpp#22142)."""
    command = [str(bin_dir / "llama-perplexity"), "-m", str(gguf_file), "-f", str(text), "-c", str(ctx)]
    for _ in range(10):
        done = subprocess.run([*command, "--chunks", str(chunks), "-t", str(threads)], capture_output=True, text=True)
        if done.returncode != 0:
            break
        estimate = parse_perplexity(done.stdout + done.stderr, chunks)
        if estimate is not None:
            return estimate
    raise RuntimeError(f"llama-perplexity failed on {gguf_file}: {(done.stderr.strip().splitlines() or [''])[-1]}")


def spap_perplexity(checkpoint: str, chunks: int) -> float:
    """`spap eval` in float32 on the same windows, scoring what llama.cpp scores (the second halves)."""
    directory = resolve_model(checkpoint)
    command = [sys.executable, "-m", "spap.cli", "eval", directory, "--ppl", str(TEST), "--seq-len", str(CTX)]
    command += ["--max-windows", str(chunks), "--score-from", str(CTX // 2), "--dtype", "float32"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return float(json.loads((Path(directory) / "eval.json").read_text())["perplexity"][str(TEST)]["perplexity"])


def llama_bench(bin_dir: Path, files: list[Path], threads: int, prompt: int, generate: int) -> dict[str, dict]:
    """{file: {"prefill": tokens/s, "decode": tokens/s}} from one llama-bench process."""
    command = [str(bin_dir / "llama-bench"), "-o", "json", "-t", str(threads), "-r", "3"]
    command += ["-p", str(prompt), "-n", str(generate)]
    for file in files:
        command += ["-m", str(file)]
    out = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    speeds: dict[str, dict] = {}
    for entry in out:
        kind = "prefill" if entry["n_prompt"] else "decode"
        speeds.setdefault(entry["model_filename"], {})[kind] = float(entry["avg_ts"])
    return speeds


def remeasure_perplexity(name: str, work: Path, threads: int, note: str) -> None:
    """llama.cpp's perplexity of the rows of ``name`` in results/llamacpp.json again, from their GGUFs
    in ``work`` (as ``main`` named them) on the text as spap reads it; spap's side and speeds are kept."""
    bin_dir = build()
    text = as_spap_reads(TEST, work)
    data = json.loads(RESULTS.read_text())
    for row in (r for r in data["rows"] if r["model"] == name):
        gguf_file = work / f"{name}-{row['checkpoint']}-{row['outtype']}.gguf"
        if not gguf_file.is_file():
            raise SystemExit(f"{gguf_file} is missing: run the full benchmark for {name} instead")
        row["llamacpp_ppl"] = round(llama_perplexity(bin_dir, gguf_file, text, row["windows"], threads), 4)
        row["ppl_ratio"] = round(row["llamacpp_ppl"] / row["spap_ppl_float32"], 5)
        row["ppl_note"] = f"{time.strftime('%Y-%m-%d')}: {note}"
        print(row["checkpoint"], row["llamacpp_ppl"], row["spap_ppl_float32"], row["ppl_ratio"], flush=True)
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")


def main() -> None:
    pin_gguf_float32()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="model name in the rows")
    parser.add_argument("--dense", help="dense checkpoint (directory or spap model name)")
    parser.add_argument("--pruned", nargs="+", default=[], help="DIR=LABEL pruned stock checkpoints")
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--outtype", default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "spap-llamacpp")
    parser.add_argument(
        "--remeasure-ppl",
        metavar="NOTE",
        help="only llama.cpp's perplexity of NAME's rows again, from the GGUFs in --work",
    )
    args = parser.parse_args()
    if args.remeasure_ppl:
        return remeasure_perplexity(args.name, args.work, args.threads, args.remeasure_ppl)
    if not args.dense:
        parser.error("--dense is required")
    bin_dir = build()
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoints = {"dense": args.dense, **{p.split("=")[1]: p.split("=")[0] for p in args.pruned}}
    files = {
        label: export(path, args.work / f"{args.name}-{label}-{args.outtype}.gguf", args.outtype)
        for label, path in checkpoints.items()
    }
    text = as_spap_reads(TEST, args.work)
    speeds = llama_bench(bin_dir, list(files.values()), args.threads, 512, 128)
    dense_speed, dense_bytes = speeds[str(files["dense"])], decode_bytes(files["dense"])
    rows = []
    for label, path in checkpoints.items():
        gguf_file = files[label]
        ppl_cpp = llama_perplexity(bin_dir, gguf_file, text, args.chunks, args.threads)
        ppl_spap = spap_perplexity(path, args.chunks)
        speed, read = speeds[str(gguf_file)], decode_bytes(gguf_file)
        decode_ratio, limit = speed["decode"] / dense_speed["decode"], dense_bytes / read
        rows.append(
            {
                "model": args.name,
                "checkpoint": label,
                "outtype": args.outtype,
                "llamacpp_ppl": round(ppl_cpp, 4),
                "spap_ppl_float32": round(ppl_spap, 4),
                "ppl_ratio": round(ppl_cpp / ppl_spap, 5),
                "windows": args.chunks,
                "ctx": CTX,
                "scored": "second half of every window",
                "prefill_tps": round(speed["prefill"], 2),
                "decode_tps": round(speed["decode"], 2),
                "prefill_speedup": round(speed["prefill"] / dense_speed["prefill"], 4),
                "decode_speedup": round(decode_ratio, 4),
                "decode_bytes": read,
                "byte_limit": round(limit, 4),
                "fraction_of_limit": round(decode_ratio / limit, 4),
                "threads": args.threads,
                "llama_cpp_python": LLAMA_CPP_PYTHON,
                "machine": machine(),
                "date": time.strftime("%Y-%m-%d"),
            }
        )
        print(json.dumps(rows[-1]))
    old = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    keep = [r for r in old if (r["model"], r["checkpoint"]) not in {(r2["model"], r2["checkpoint"]) for r2 in rows}]
    RESULTS.write_text(json.dumps({"meta": {"script": "benchmarks/llamacpp.py"}, "rows": keep + rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
