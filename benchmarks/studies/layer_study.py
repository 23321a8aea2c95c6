"""Per-layer study of solver hyperparameters on a real model (held-out reconstruction error).

Captures the MLP inputs of a few decoder layers of the *dense* model on calibration text, fits each
solver variant on the first 75% of tokens and reports the relative output error
||y_pruned - y_dense||^2 / ||y_dense||^2 on the remaining 25% (held out), plus solver time.

    python benchmarks/studies/layer_study.py --layers 2 10 18 26 --sparsity 0.3 --out results/layer-study.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # studies/, benchmarks/

from common import capture_dense, held_out_layer  # noqa: E402

from spap.adapters import get_adapter  # noqa: E402
from spap.config import CalibrationConfig  # noqa: E402
from spap.core import MLPStatistics, SolverConfig, prune_mlp  # noqa: E402
from spap.core.stats import sample_token_positions  # noqa: E402
from spap.io.calibration import calibration_tokens  # noqa: E402
from spap.io.models import load_model  # noqa: E402

VARIANTS: dict[str, dict] = {
    "magnitude": dict(method="magnitude"),
    "wanda-sp": dict(method="wanda-sp"),
    "flap(bias)": dict(method="flap"),
    "fasp(ls)": dict(method="fasp"),
    "spap score-only t=1 +ls": dict(selection="score", refit="ls"),
    "spap penalty t=1 +ls": dict(refit="ls"),
    "spap penalty t=0 +ls": dict(refit="ls", score_exponent=0.0),
    "spap penalty t=0.5 +ls": dict(refit="ls", score_exponent=0.5),
    "spap penalty a=0.1 +ls": dict(refit="ls", momentum=0.1),
    "spap penalty a=0.6 +ls": dict(refit="ls", momentum=0.6),
    "spap penalty rho0=0.1 +ls": dict(refit="ls", rho_init=0.1),
    "spap penalty K=60 tau=1.15 +ls": dict(refit="ls", penalty_rounds=60, rho_growth=1.15),
    "spap penalty +alternating": dict(),
    "spap penalty +alternating 32k": dict(refit_tokens=32768),
    "spap penalty +gd": dict(refit="gd"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 10, 18, 26])
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--variants", nargs="*", default=None)
    ap.add_argument("--out", default="results/layer-study.json")
    args = ap.parse_args()
    model, tok, path = load_model(args.model)
    adapter = get_adapter(model)
    ids = calibration_tokens(tok, CalibrationConfig(n_samples=args.n_samples, seq_len=args.seq_len))
    xs, _ = capture_dense(model, adapter, ids, args.layers)
    names = args.variants or list(VARIANTS)
    rows = []
    for li in args.layers:
        x = xs[li]
        n_train, dense, k = held_out_layer(model, adapter, x, li, args.sparsity)
        for name in names:
            cfg = SolverConfig(**VARIANTS[name])
            pos = sample_token_positions(n_train, cfg.refit_tokens, 0) if cfg.needs_sample else None
            stats = MLPStatistics(dense.width, dense.hidden_size, "cpu", pos)
            stats.update(x[:n_train], dense)
            t0 = time.perf_counter()
            res = prune_mlp(dense, stats, k, cfg, stats.sample_inputs())
            sec = time.perf_counter() - t0
            with torch.no_grad():
                xt = x[n_train:]
                yd = dense(xt)
                err = float((yd - res.weights(xt)).pow(2).sum() / yd.pow(2).sum())
                xtr = x[:n_train:4]
                ydt = dense(xtr)
                err_train = float((ydt - res.weights(xtr)).pow(2).sum() / ydt.pow(2).sum())
            rows.append(dict(layer=li, variant=name, heldout_error=err, train_error=err_train, seconds=sec))
            print(f"layer {li:3d} {name:34s} heldout {err:.4f} train {err_train:.4f} {sec:6.1f}s", flush=True)
    print("\nmean held-out relative error over layers")
    for name in names:
        vals = [r["heldout_error"] for r in rows if r["variant"] == name]
        print(f"{name:34s} {sum(vals) / len(vals):.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(model=path, sparsity=args.sparsity, rows=rows), indent=2))


if __name__ == "__main__":
    main()
