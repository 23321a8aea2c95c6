"""Refit candidates compared layer by layer: held-out reconstruction error against seconds (issue 51).

For each chosen decoder layer, the dense MLP inputs are captured on calibration text; SPAP's
selection with the closed-form W_down (``--refit ls``) is fit on the first 75% of the tokens, and
each refit starts from it on the same sample of ``--refit-tokens`` of those tokens. The error is measured after every
round / iteration on the last 25% (held out): ||y_dense - y_pruned||^2 / ||y_dense||^2.

- ``alternating``: spap's refit (closed-form W_down, 3 Armijo gradient steps on W_up/W_gate per round);
- ``varpro-lbfgs``: L-BFGS (strong Wolfe) on W_up/W_gate with W_down eliminated in closed form at
  every evaluation (variable projection: by the envelope theorem the gradient at the optimal W_down
  is the objective's partial gradient, so no graph runs through the solve).

    python benchmarks/studies/refit_candidates.py --layers 2 10 18 26 --out results/refit-candidates-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from common import capture_dense, held_out_layer, machine  # noqa: E402

from spap.adapters import get_adapter  # noqa: E402
from spap.config import CalibrationConfig  # noqa: E402
from spap.core import MLPStatistics, SolverConfig, prune_mlp  # noqa: E402
from spap.core.linalg import QuadraticLS  # noqa: E402
from spap.core.mlp import MLPWeights  # noqa: E402
from spap.core.refit import Holdout, alternating_refit  # noqa: E402
from spap.core.stats import sample_token_positions  # noqa: E402
from spap.io.calibration import calibration_tokens  # noqa: E402
from spap.io.models import load_model  # noqa: E402


class TimedHoldout(Holdout):
    """Held-out rows that also record when each error was measured (seconds since ``t0``, the
    measurement itself excluded)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.t0, self.spent = 0.0, 0.0
        self.times: list[float] = []

    def error(self, weights: MLPWeights) -> float:
        now = time.perf_counter()
        self.times.append(now - self.t0 - self.spent)
        out = super().error(weights)
        self.spent += time.perf_counter() - now
        return out


def alternating(start: MLPWeights, x: torch.Tensor, y: torch.Tensor, test: TimedHoldout, rounds: int) -> None:
    damping = SolverConfig().damping
    test.t0 = time.perf_counter()
    alternating_refit(start, x, y, rounds, 3, damping, False, holdout=test, patience=rounds + 1)


def varpro_lbfgs(start: MLPWeights, x: torch.Tensor, y: torch.Tensor, test: TimedHoldout, iterations: int) -> None:
    damping_rel = SolverConfig().damping
    with torch.no_grad():
        z0 = start.intermediate(x)
        damping = damping_rel * float(z0.pow(2).sum(0).mean())
        scale = 0.5 * float(y.pow(2).sum())
    up = start.up.detach().clone().requires_grad_(True)
    gate = start.gate.detach().clone().requires_grad_(True)
    best = {"down": start.down}

    def weights_at() -> MLPWeights:
        return replace(start, up=up, gate=gate, down=best["down"])

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        trial = replace(start, up=up, gate=gate)
        z = trial.intermediate(x)
        with torch.no_grad():
            w, _ = QuadraticLS.from_data(z.detach(), y, None, product_dtype=torch.float32).solve(
                damping, fit_bias=False
            )
            best["down"] = w.to(x)
        fitted = replace(trial, down=best["down"])
        r = y - fitted.output_from_intermediate(z)
        loss = (0.5 * r.pow(2).sum() + 0.5 * damping * best["down"].pow(2).sum()) / scale
        loss.backward()
        return loss

    optimiser = torch.optim.LBFGS([up, gate], lr=1.0, max_iter=1, history_size=10, line_search_fn="strong_wolfe")
    test.t0 = time.perf_counter()
    with torch.no_grad():
        test.error(replace(start, down=start.down))
    for _ in range(iterations):
        optimiser.step(closure)
        with torch.no_grad():
            test.error(replace(weights_at(), up=up.detach(), gate=gate.detach()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 10, 18, 26])
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--calib", default="bundled")
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--refit-tokens", type=int, default=8192, help="the refits' sample (spap's default 8,192)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok, path = load_model(args.model)
    adapter = get_adapter(model)
    calib = CalibrationConfig(source=args.calib, n_samples=args.n_samples, seq_len=args.seq_len)
    xs, _ = capture_dense(model, adapter, calibration_tokens(tok, calib), args.layers)
    rows = []
    for li in args.layers:
        x = xs[li]
        n_train, dense, k = held_out_layer(model, adapter, x, li, args.sparsity)
        cfg = SolverConfig(refit="ls")
        stats = MLPStatistics(dense.width, dense.hidden_size, "cpu", None)
        stats.update(x[:n_train], dense)
        started = time.perf_counter()
        start = prune_mlp(dense, stats, k, cfg, None).weights
        select_seconds = time.perf_counter() - started
        positions = sample_token_positions(n_train, args.refit_tokens, 0)
        xf = x[:n_train][positions] if positions is not None else x[:n_train]
        with torch.no_grad():
            yf, yt = dense(xf), dense(x[n_train:])
        with torch.no_grad():
            ls_error = float((yt - start(x[n_train:])).pow(2).sum() / yt.pow(2).sum())
        for name, run, budget in (
            ("alternating", alternating, args.rounds),
            ("varpro-lbfgs", varpro_lbfgs, args.iterations),
        ):
            test = TimedHoldout(x[n_train:], yt)
            run(start, xf, yf, test, budget)
            best = min(test.errors)
            rows.append(
                dict(
                    layer=li,
                    refit=name,
                    errors=test.errors,
                    seconds=test.times,
                    ls_error=ls_error,
                    best_error=best,
                    gain=1 - best / ls_error,
                    select_seconds=select_seconds,
                )
            )
            at = test.errors.index(best)
            print(
                f"layer {li:3d} {name:14s} ls {ls_error:.5f} best {best:.5f} ({100 * (1 - best / ls_error):.2f}%) "
                f"at {test.times[at]:.1f} s of {test.times[-1]:.1f} s",
                flush=True,
            )
    meta = dict(
        model=path,
        sparsity=args.sparsity,
        calibration=args.calib,
        tokens=[args.n_samples, args.seq_len],
        refit_tokens=args.refit_tokens,
        machine=machine(),
        command=" ".join(sys.argv),
    )
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
