"""Pruning time and peak memory by model size, with one decoder layer on the accelerator at a time.

Model shapes come from public configs (random weights: time and memory depend only on shapes);
calibration tokens are random ids of the requested count.  ``--layers N`` keeps the first N
decoder layers: per-layer time and peak accelerator memory do not depend on the layer count
(only the host copy of the weights does), so a truncated model measures them for the full one.

    python benchmarks/scale.py --shape llama3-8b --layers 4      # on a GPU machine
    python benchmarks/scale.py --shape llama3-1b --n-samples 8 --seq-len 256 --device cpu

Every row carries the device plan's prediction per phase (``spap.runtime.device_memory``) beside the
measured peak of each phase: ``torch.cuda.max_memory_allocated`` on a GPU, or with ``--meter`` on a
CPU the tensor bytes alive (``TensorMeter``: the tensors a GPU run would allocate; there the batch's
inputs, its recorded attention outputs and the pruned layers' new weights are host memory, so run
one layer and one batch for a like-for-like figure).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import SHAPES, VARIANTS, machine, markdown_table, run_isolated, shape_model  # noqa: E402


def run(
    shape: str,
    layers: int | None,
    variant: str,
    sparsity: float,
    n_samples: int,
    seq_len: int,
    device: str,
    dtype: str,
    seed: int,
    stored_dtype: str | None = None,
    meter: bool = False,
) -> dict:
    import spap
    from spap.config import CalibrationConfig, PruneConfig, RuntimeConfig
    from spap.core import SolverConfig
    from spap.runtime.device_memory import kept_on_host, predict_device_peak
    from spap.runtime.memory import elements_per_layer
    from spap.runtime.tensor_meter import metering

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    stored = getattr(torch, stored_dtype or dtype)
    model = shape_model(shape, stored, "cpu", layers)  # the pipeline keeps weights on the host
    build_seconds = time.perf_counter() - t0
    ids = torch.randint(0, model.config.vocab_size, (n_samples, seq_len), generator=torch.Generator().manual_seed(seed))
    overrides = dict(VARIANTS[variant])
    cfg = PruneConfig(
        sparsity=sparsity,
        calibration=CalibrationConfig(n_samples=n_samples, seq_len=seq_len),  # the ids' shape, for the plan
        solver=SolverConfig(**overrides.pop("solver", {})),
        runtime=RuntimeConfig(device=device, compute_dtype=dtype),
        seed=seed,
        **overrides,
    )
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    per_layer_elements = elements_per_layer(shapes)
    outside = sum(p.numel() for p in model.parameters()) - sum(per_layer_elements.values())
    text = model.config
    plan = predict_device_peak(
        text.hidden_size,
        text.intermediate_size,
        max(per_layer_elements.values()),
        outside,
        cfg,
        getattr(torch, dtype),
        stored.itemsize,
    )
    with metering() if meter else contextlib.nullcontext():
        report = spap.prune(model, config=cfg, calibration_ids=ids)
    per_layer = [layer.seconds["total"] for layer in report.layers]
    measured = {
        phase: max(layer.gpu_peak_gib.get(phase, 0.0) for layer in report.layers)
        for phase in sorted({name for layer in report.layers for name in layer.gpu_peak_gib})
    }
    on_host = {}
    if meter:  # what the CPU keeps in place that a GPU run moves to the host (one batch, one layer)
        head_dim = text.hidden_size // text.num_attention_heads
        kept = max(report.widths)
        on_host = kept_on_host(cfg, text.hidden_size, kept, head_dim, getattr(torch, dtype), stored)
        measured = {phase: gib - on_host.get(phase, 0.0) for phase, gib in measured.items()}
    return {
        "shape": shape,
        "layers": model.config.num_hidden_layers,
        "variant": variant,
        "sparsity": sparsity,
        "calibration_shape": [n_samples, seq_len],
        "device": report.device,
        "dtype": dtype,
        "stored_dtype": str(stored).removeprefix("torch."),
        "metered": meter,
        "parameters_before": report.parameters_before,
        "parameters_after": report.parameters_after,
        "host_weight_gib": report.parameters_before * torch.finfo(getattr(torch, dtype)).bits / 8 / 2**30,
        "build_seconds": build_seconds,
        "prune_seconds": report.seconds["total"],
        "seconds_per_layer": sum(per_layer) / len(per_layer),
        "layer_seconds": per_layer,
        "memory": report.memory,
        # per phase of a layer (statistics, solve, final_ls, propagate), the largest over layers: CUDA,
        # or the metered tensor bytes on a CPU
        "gpu_peak_gib_by_phase": measured,
        "metered_on_host_gib": on_host,  # taken off the metered phases (see above)
        "predicted_gpu_gib_by_phase": {phase: plan.phase_gib(phase) for phase in plan.phases},
        # the same without what CUDA kernels allocate inside an operation: what the meter can see
        "predicted_tensors_gib_by_phase": {phase: plan.tensor_gib(phase) for phase in plan.phases},
        "predicted_gpu_gib": plan.peak_gib,
        "mean_layer_error": sum(r.error for r in report.layers) / len(report.layers),
    }


def run_job(job: dict) -> dict:
    return run(**job)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="+", choices=list(SHAPES), default=["llama3-1b"])
    ap.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers (default: all)")
    ap.add_argument("--variant", default="spap", choices=[v for v in VARIANTS if v != "dense"])
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype of the layers")
    ap.add_argument("--stored-dtype", default=None, help="dtype of the host weights (default: --dtype)")
    ap.add_argument("--meter", action="store_true", help="measure each phase's tensor bytes (any device)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or f"results/scale-{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in args.shape:
        job = dict(
            shape=shape,
            layers=args.layers,
            variant=args.variant,
            sparsity=args.sparsity,
            n_samples=args.n_samples,
            seq_len=args.seq_len,
            device=args.device,
            dtype=args.dtype,
            seed=args.seed,
            stored_dtype=args.stored_dtype,
            meter=args.meter,
        )
        rows.append(run_isolated(job, run_job))  # own process: peak host RSS is this shape's
        out.write_text(json.dumps({"machine": machine(), "torch": torch.__version__, "rows": rows}, indent=2))
        print(json.dumps(rows[-1], indent=1), flush=True)
    table = [
        [
            r["shape"],
            r["layers"],
            r["parameters_before"] / 1e9,
            r["host_weight_gib"],
            r["seconds_per_layer"],
            r["prune_seconds"],
            r["memory"].get("peak_gpu_gib", "-"),
            r["memory"]["peak_rss_gib"],
        ]
        for r in rows
    ]
    print(
        markdown_table(
            [
                "shape",
                "layers",
                "params (B)",
                "host weights GiB",
                "s / layer",
                "total s",
                "peak GPU GiB",
                "peak host RSS GiB",
            ],
            table,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
