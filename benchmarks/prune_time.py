"""Pruning time against its floor: per-stage seconds of one prune, and the time the calibration passes
and statistics would take at this machine's matmul rate.

    python benchmarks/prune_time.py --model smollm2 --recipes spap default --n-samples 16 --seq-len 2048

floor = forward FLOPs of one pass of every decoder layer over the calibration tokens / the compute
dtype's matmul rate  +  Gram and cross products (2 N (m^2 + d m) per layer) / the rate spap multiplies
them at: the bfloat16 rate for bfloat16 activations on a CPU with bfloat16 instructions (exact there,
see spap.core.bf16_products), else float32; both rates measured in this run on this machine.  Each recipe runs in a fresh process (its own
peak memory).  Appends one row per run to results/prune-time.json (a rerun of the same model, recipe
and tokens replaces its row) and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import load_rows, machine, markdown_table, pin_gguf_float32, run_isolated, save_rows  # noqa: E402

RECIPES: dict[str, dict[str, Any]] = {
    # name: PruneConfig overrides ("solver": SolverConfig overrides)
    "default": {},
    "spap": {"solver": {"method": "spap"}},  # the published recipe: penalty loop + alternating refit
    "spap-all-rounds": {"solver": {"method": "spap", "refit_patience": 0}},  # every refit round, no early stop
    "spap-no-refit": {"solver": {"method": "spap", "refit": "ls"}},
    "fasp": {"solver": {"method": "fasp"}},
    "cfsp": {"solver": {"method": "cfsp"}},
}


def matmul_rate(dtype: Any, n: int, k: int, m: int, seconds: float = 1.0) -> float:
    """FLOP/s of (n, k) @ (k, m) in ``dtype`` on the CPU, best of repeated runs over ~``seconds``."""
    import torch

    a, b = torch.randn(n, k).to(dtype), torch.randn(k, m).to(dtype)
    a @ b  # warm-up
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n * k * m / best


def floor_flops(model: Any, tokens: int, seq_len: int) -> tuple[float, float, list[int]]:
    """(forward FLOPs of all decoder layers, float32 statistics FLOPs, (d, m)) for ``tokens`` tokens.

    Forward: 2 x (weights of the layer's Linears) per token plus causal attention, 2 x seq_len x
    head_dim per query head per token (QK^T and AV over on average seq_len / 2 keys)."""
    from torch import nn

    from spap.adapters import get_adapter

    adapter = get_adapter(model)
    forward = stats = 0.0
    d = m = 0
    for layer in adapter.decoder_layers(model):
        linear = sum(mod.weight.numel() for mod in layer.modules() if isinstance(mod, nn.Linear))
        n_heads, _, head_dim = adapter.attention_shape(layer)
        forward += tokens * (2 * linear + 2 * seq_len * head_dim * n_heads)
        w = adapter.read_mlp(layer)
        d, m = w.hidden_size, w.width
        stats += tokens * 2 * (m * m + d * m)
    return forward, stats, [d, m]


def _time_one(job: dict[str, Any]) -> dict[str, Any]:
    """Load, prune, save (to a temporary directory): per-stage seconds and the floor, in one process."""
    import torch

    import spap
    from spap.config import CalibrationConfig, PruneConfig
    from spap.core import SolverConfig
    from spap.core.bf16_products import cpu_multiplies_bf16
    from spap.io.models import load_model
    from spap.runtime.device import resolve_device, resolve_dtype

    torch.manual_seed(job["seed"])
    t0 = time.perf_counter()
    model, tokenizer, path = load_model(job["model"])
    load_seconds = time.perf_counter() - t0
    overrides = dict(RECIPES[job["recipe"]])
    solver = SolverConfig(**overrides.pop("solver", {}))
    cfg = PruneConfig(
        sparsity=job["sparsity"],
        solver=solver,
        seed=job["seed"],
        calibration=CalibrationConfig(job["calib"], job["n_samples"], job["seq_len"], job["seed"]),
        **overrides,
    )
    device = resolve_device(cfg.runtime.device)
    dtype = resolve_dtype(cfg.runtime.compute_dtype, device)
    forward, stats, (d, m) = floor_flops(model, job["n_samples"] * job["seq_len"], job["seq_len"])
    rate_compute = matmul_rate(dtype, 8192, d, m)
    rate_f32 = matmul_rate(torch.float32, m, 8192, m)
    bf16_statistics = dtype == torch.bfloat16 and device.type == "cpu" and cpu_multiplies_bf16()
    floor = forward / rate_compute + stats / (rate_compute if bf16_statistics else rate_f32)

    report = spap.prune(model, tokenizer, cfg)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        spap.save_pruned(model, Path(tmp) / "out", tokenizer, report.to_dict())
    save_seconds = time.perf_counter() - t0

    stages: dict[str, float] = {"load": load_seconds}
    stages.update({k: v for k, v in report.seconds.items() if k != "total"})
    for layer in report.layers:
        for key, value in layer.seconds.items():
            if key != "total":
                stages[key] = stages.get(key, 0.0) + value
    stages["save"] = save_seconds
    seconds = report.seconds["total"]
    return {
        "model": Path(path).name,
        "recipe": job["recipe"],
        "sparsity": job["sparsity"],
        "calibration": job["calib"],
        "tokens": report.calibration_shape[0] * report.calibration_shape[1],
        "calibration_shape": report.calibration_shape,
        "seconds": seconds,
        "floor_seconds": floor,
        "ratio": seconds / floor,
        "stages": {k: round(v, 2) for k, v in stages.items()},
        "floor": {
            "forward_flops": forward,
            "statistics_flops": stats,
            "compute_dtype": str(dtype).replace("torch.", ""),
            "compute_flops_per_s": rate_compute,
            "float32_flops_per_s": rate_f32,
            "statistics_rate": "bfloat16" if bf16_statistics else "float32",
        },
        "peak_rss_gib": report.memory["peak_rss_gib"],
        "peak_gpu_gib": report.memory.get("peak_gpu_gib"),
        "refit_rounds": [r.refit_rounds for r in report.layers],
        "errors": [r.error for r in report.layers],
        "machine": machine(),
        "device": report.device,
    }


def main() -> None:
    pin_gguf_float32()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--recipes", nargs="+", default=["spap", "default"], choices=list(RECIPES))
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--calib", default="bundled")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/prune-time.json")
    args = ap.parse_args()

    out = Path(args.out)
    rows = load_rows(out)
    for recipe in args.recipes:
        job = dict(vars(args), recipe=recipe)
        row = run_isolated(job, _time_one)
        rows = [r for r in rows if (r["model"], r["recipe"], r["tokens"]) != (row["model"], recipe, row["tokens"])]
        rows.append(row)
        save_rows(out, rows, {"command": " ".join(sys.argv)})
        print(f"{recipe}: {row['seconds']:.0f} s, floor {row['floor_seconds']:.0f} s, ratio {row['ratio']:.2f}")
    stage_names = sorted({k for r in rows for k in r["stages"]})
    print(
        markdown_table(
            ["model", "recipe", "tokens", "seconds", "floor s", "ratio", *stage_names, "machine"],
            [
                [
                    r["model"],
                    r["recipe"],
                    r["tokens"],
                    r["seconds"],
                    r["floor_seconds"],
                    r["ratio"],
                    *[r["stages"].get(k, "") for k in stage_names],
                    r["machine"],
                ]
                for r in rows
            ],
        )
    )


if __name__ == "__main__":
    main()
