"""Which layers does a solver variant help or hurt?  Prune a group of layers on dense inputs, swap
them into the otherwise dense model, and measure perplexity plus two layer-error metrics.

    python benchmarks/layer_swap.py --layers 10 11 12 13 14 15 16 17 18 19 \
        --ppl-file ../shared/data/wikitext-2-raw/wiki.test.raw --variants '{"refit": "ls"}' '{}'

Each variant is a JSON object of SolverConfig overrides (the rows of results/refit-diagnosis-smollm2
predate the refit safeguard: add "refit_safeguard": false to repeat them) plus optional "weighting": "none" | "residual"
| "capC" (1 / min(mean h^2, C x median), the residual weighting with the top clipped), and
"sample_first": true (the refit sample also holds every window's first token).  Every layer
of the group is fitted on the dense model's calibration inputs (no error propagation), so the
comparison is paired and exact.  Metrics on the evaluation text's tokens, per layer:
  agg    = sum_n ||e_n||^2 / sum_n ||y_n||^2                 (the plain objective, relative)
  tokrel = mean_n ||e_n||^2 / ||h_n||^2, h = layer output     (error as the next norm sees it)
  first  = tokrel over the first token of each window only     (the attention sink)
  p99, p999 = quantiles of the per-token ||e_n||^2 / ||h_n||^2; late = tokrel at positions >= 1024
  agg16, tokrel16 = agg, tokrel with weights and inputs rounded to --eval-dtype (bfloat16)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import capture_dense, machine  # noqa: E402

from spap.adapters import get_adapter  # noqa: E402
from spap.calibration import calibration_tokens, load_text, tokenize  # noqa: E402
from spap.config import CalibrationConfig  # noqa: E402
from spap.core import MLPStatistics, SolverConfig, prune_mlp  # noqa: E402
from spap.core.solver import finalize_down, resolve_fit_bias  # noqa: E402
from spap.core.stats import sample_token_positions  # noqa: E402
from spap.evaluation.perplexity import perplexity  # noqa: E402
from spap.models import load_model  # noqa: E402
from spap.layer_mlp import residual_token_weights  # noqa: E402


def token_weights(mode: str, h: torch.Tensor) -> torch.Tensor | None:
    """Token weights (N,) of a variant: None, the pipeline's residual weights w = 1 / mean(h^2), or
    those with mean(h^2) clipped at C x its median ("capC": w = max(w, 1 / (C x median)))."""
    if mode == "none":
        return None
    w = residual_token_weights(h)
    if mode == "residual":
        return w
    if mode.startswith("cap"):
        return w.clamp_min(1.0 / (float(mode[3:]) * float(h.pow(2).mean(-1).median())))
    raise ValueError(f"unknown weighting {mode!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: embedded SmolLM2-135M)")
    ap.add_argument("--layers", type=int, nargs="+", required=True)
    ap.add_argument("--variants", nargs="+", required=True, help="JSON objects, e.g. '{\"refit\": \"ls\"}'")
    ap.add_argument("--ppl-file", required=True)
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows at 2048 (and 16x as many at 128)")
    ap.add_argument("--out", default="results/layer-swap.json")
    ap.add_argument("--eval-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="perplexity matmul dtype; bfloat16 also reports agg16/tokrel16 (layer error in it)")
    args = ap.parse_args()
    model, tok, path = load_model(args.model)
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    dense = {i: adapter.read_mlp(layers[i]).to(dtype=torch.float32) for i in args.layers}
    text = load_text(args.ppl_file)
    calib = calibration_tokens(tok, CalibrationConfig())
    xs, hs = capture_dense(model, adapter, calib, args.layers, outputs=True)
    eval_ids = tokenize(tok, text)[: 8 * 2048].view(8, 2048)  # layer metrics on 8 windows of 2048
    wx, wh = capture_dense(model, adapter, eval_ids, args.layers, outputs=True)
    rows = []
    for spec in args.variants:
        overrides = json.loads(spec)
        mode = overrides.pop("weighting", "none")
        sample_first = overrides.pop("sample_first", False)
        cfg = SolverConfig(**overrides)
        t0, per_layer = time.perf_counter(), {}
        for i in args.layers:
            x, d, w = xs[i], dense[i], token_weights(mode, hs[i])
            pos = sample_token_positions(x.shape[0], cfg.refit_tokens, 0) if cfg.needs_sample else None
            if pos is not None and sample_first:
                pos = torch.cat([pos, torch.arange(0, x.shape[0], calib.shape[1])]).unique()  # sorted
            stats = MLPStatistics(d.width, d.hidden_size, "cpu", pos)
            stats.update(x, d, weight=w)
            k = int(round(args.sparsity * d.width))
            res = prune_mlp(d, stats, k, cfg, stats.sample_inputs(), torch.bfloat16, None, stats.sample_weights())
            if res.needs_final_ls:  # as the pipeline: W_down re-fit on all tokens
                final = MLPStatistics(res.weights.width, d.hidden_size, "cpu")
                final.update(x, res.weights, d, weight=w)
                res = finalize_down(res, final, cfg, resolve_fit_bias(cfg, d))
            adapter.write_mlp(layers[i], res.weights)
            with torch.no_grad():
                y = d(wx[i])
                y2, h2 = y.pow(2).sum(), wh[i].pow(2).sum(-1)
                e = (y - res.weights(wx[i])).pow(2).sum(-1)
                rel = e / h2
                by_position = rel.view(eval_ids.shape)
                per_layer[i] = dict(agg=float(e.sum() / y2), tokrel=float(rel.mean()),
                                    first=float(by_position[:, 0].mean()), refit_accepted=res.refit_accepted,
                                    p99=float(rel.quantile(0.99)), p999=float(rel.quantile(0.999)),
                                    late=float(by_position[:, 1024:].mean()))
                if args.eval_dtype != "float32":  # the same error with weights and inputs rounded to it
                    low = getattr(torch, args.eval_dtype)
                    e16 = (y - res.weights.to(dtype=low)(wx[i].to(low)).float()).pow(2).sum(-1)
                    per_layer[i].update(agg16=float(e16.sum() / y2), tokrel16=float((e16 / h2).mean()))
        seconds = time.perf_counter() - t0
        ppl = {n: perplexity(model, tok, text, n, batch_size=2 * 2048 // n, dtype=getattr(torch, args.eval_dtype),
                             max_windows=args.windows * 2048 // n, progress=False).perplexity for n in (2048, 128)}
        for i in args.layers:
            adapter.write_mlp(layers[i], dense[i])
        metrics = [m for m in ("agg", "tokrel", "first", "p99", "p999", "late", "agg16", "tokrel16") if m in per_layer[args.layers[0]]]
        mean = {m: sum(v[m] for v in per_layer.values()) / len(per_layer) for m in metrics}
        rows.append(dict(variant=spec, ppl2048=ppl[2048], ppl128=ppl[128], **mean, layers=per_layer, seconds=seconds))
        print(f"{spec:44s} ppl@2048 {ppl[2048]:.3f} ppl@128 {ppl[128]:.3f} agg {mean['agg']:.4f} "
              f"tokrel {mean['tokrel']:.5f} first {mean['first']:.5f} p99 {mean['p99']:.5f} p999 {mean['p999']:.5f} "
              f"late {mean['late']:.5f} ({seconds:.0f}s)", flush=True)
        print(f"    per layer ({', '.join(metrics)}):", {i: tuple(round(v[m], 5) for m in metrics) for i, v in per_layer.items()})
        rejected = [i for i, v in per_layer.items() if v["refit_accepted"] is False]
        if rejected:
            print(f"    refit safeguard restored the closed form in layers {rejected}")
        if "agg16" in mean:
            print(f"    in {args.eval_dtype}: agg {mean['agg16']:.4f} tokrel {mean['tokrel16']:.5f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = dict(model=path, layers=args.layers, sparsity=args.sparsity, windows=args.windows, machine=machine())
    Path(args.out).write_text(json.dumps(dict(meta, rows=rows), indent=2))


if __name__ == "__main__":
    main()
