"""Which layers does a solver variant help or hurt?  Prune a group of layers on dense inputs, swap
them into the otherwise dense model, and measure perplexity plus two layer-error metrics.

    python benchmarks/studies/layer_swap.py --layers 10 11 12 13 14 15 16 17 18 19 \
        --ppl-file ../shared/data/wikitext-2-raw/wiki.test.raw --variants '{"refit": "ls"}' '{}'

Each variant is a JSON object of SolverConfig overrides (the rows of results/refit-diagnosis-smollm2
predate the refit safeguard: add "refit_safeguard": false to repeat them) plus optional "weighting": "none" | "residual"
| "capC" (1 / min(mean h^2, C x median), the residual weighting with the top clipped), and
"sample_first": true (the refit sample also holds every window's first token), "metric": ridge (the
whole solve in the coordinates of the layer output's empirical Fisher, see fisher_metric.py) or
"metric_refit": ridge (plain selection and closed form, only the refit in Fisher coordinates), "input_noise":
sigma (= SolverConfig.refit_input_noise: the refit on rows x + sigma rms(x) eps, dense targets there).
``--compute-dtype float32`` captures and refits in float32 (for CPUs without native bf16).
``--fisher-ids FILE.pt`` takes the Fisher on other token ids (e.g. sample_text.py's: the true Fisher).
The ``--ppl-file`` may be any text (``bundled-heldout``: the calibration domain; sample_text.py's
samples); the dense model's perplexity on it is the first row.
``--token-nll DIR`` saves per-token NLLs of the dense model and each variant for token_loss_split.py.  Every layer
of the group is fitted on the dense model's calibration inputs (no error propagation), so the
comparison is paired and exact.  Metrics on the evaluation text's tokens, per layer:
  agg    = sum_n ||e_n||^2 / sum_n ||y_n||^2                 (the plain objective, relative)
  tokrel = mean_n ||e_n||^2 / ||h_n||^2, h = layer output     (error as the next norm sees it)
  first  = tokrel over the first token of each window only     (the attention sink)
  p99, p999 = quantiles of the per-token ||e_n||^2 / ||h_n||^2; late = tokrel at positions >= 1024
  common = ||mean_n u_n||^2, u_n = e_n / ||h_n|| over all tokens but each window's first: the part of
           the normalised error shared by every token (attention averages values, so a shared error
           survives averaging over many positions while independent ones cancel)
  wincommon = the same mean taken within each window, averaged over windows
  agg16, tokrel16 = agg, tokrel with weights and inputs rounded to --eval-dtype (bfloat16)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # studies/, benchmarks/

from common import capture_dense, machine  # noqa: E402
from fisher_metric import OutputMetric, layer_output_fisher  # noqa: E402

from spap.adapters import get_adapter  # noqa: E402
from spap.config import CalibrationConfig  # noqa: E402
from spap.core import MLPStatistics, MLPWeights, SolverConfig, prune_mlp  # noqa: E402
from spap.core.refit import alternating_refit, perturbed_rows  # noqa: E402
from spap.core.solver import MLPPruneResult, finalize_down, resolve_fit_bias  # noqa: E402
from spap.core.stats import sample_token_positions  # noqa: E402
from spap.evaluation.perplexity import perplexity  # noqa: E402
from spap.io.calibration import calibration_tokens, load_text, tokenize  # noqa: E402
from spap.io.models import load_model  # noqa: E402
from spap.pruning.mlp import residual_token_weights  # noqa: E402


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


def solve(
    dense: MLPWeights,
    x: torch.Tensor,
    w: torch.Tensor | None,
    k: int,
    cfg: SolverConfig,
    positions: torch.Tensor | None,
    metric: OutputMetric | None,
    metric_refit_only: bool,
    refit_dtype: torch.dtype = torch.bfloat16,
) -> MLPPruneResult:
    """Prune one MLP as the pipeline does (solve, then W_down on all tokens).  ``metric``: solve in
    Fisher coordinates; with ``metric_refit_only`` select and fit the closed form in plain coordinates
    and run only the alternating refit in Fisher coordinates (no safeguard)."""
    target = dense if metric is None or metric_refit_only else metric.to_metric(dense)
    stats = MLPStatistics(dense.width, dense.hidden_size, "cpu", positions)
    stats.update(x, target, weight=w)
    fit_bias = resolve_fit_bias(cfg, dense)
    if metric is not None and metric_refit_only:
        res = prune_mlp(target, stats, k, replace(cfg, refit="ls"))
        if cfg.needs_sample:
            x_s = perturbed_rows(stats.sample_inputs(), cfg.refit_input_noise)
            target, w_s = metric.to_metric(dense), stats.sample_weights()
            with torch.no_grad():
                y_s = target(x_s)
            with torch.autocast("cpu", dtype=refit_dtype, enabled=refit_dtype != torch.float32):
                new, history = alternating_refit(
                    metric.to_metric(res.weights),
                    x_s,
                    y_s,
                    cfg.refit_rounds,
                    cfg.refit_grad_steps,
                    cfg.damping,
                    fit_bias,
                    cfg.refit_proximal,
                    w_s,
                )
            res = replace(res, weights=new, refit_history=history, needs_final_ls=True)
    else:
        x_s = stats.sample_inputs() if cfg.needs_sample else None  # perturbed in prune_mlp (refit_input_noise)
        res = prune_mlp(target, stats, k, cfg, x_s, refit_dtype, None, stats.sample_weights())
    if res.needs_final_ls:  # as the pipeline: W_down re-fit on all tokens
        final = MLPStatistics(res.weights.width, dense.hidden_size, "cpu")
        final.update(x, res.weights, target, weight=w)
        res = finalize_down(res, final, cfg, fit_bias)
    return res if metric is None else replace(res, weights=metric.from_metric(res.weights))


def fisher_for(model: Any, adapter: Any, calib: torch.Tensor, args: argparse.Namespace) -> list[torch.Tensor]:
    cache = Path(args.fisher_cache) if args.fisher_cache else None
    if cache is not None and cache.is_file():
        return torch.load(cache)
    t0 = time.perf_counter()
    fisher = layer_output_fisher(model, adapter, calib)
    print(
        f"Fisher matrices of {len(fisher)} layers on {calib.numel()} calibration tokens: {time.perf_counter() - t0:.0f}s"
    )
    if cache is not None:
        torch.save(fisher, cache)
    return fisher


@torch.no_grad()
def token_nll(model: Any, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Next-token NLL (windows, seq_len - 1) on the perplexity windows ``ids`` (windows, seq_len), bf16
    autocast, and the ids."""
    windows = ids.shape[0]
    nll = []
    for b in range(windows):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids[b : b + 1], use_cache=False).logits.float()
        nll.append(torch.nn.functional.cross_entropy(logits[0, :-1], ids[b, 1:], reduction="none"))
    return dict(nll=torch.stack(nll), ids=ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: embedded SmolLM2-135M)")
    ap.add_argument("--layers", type=int, nargs="+", required=True)
    ap.add_argument("--variants", nargs="+", required=True, help='JSON objects, e.g. \'{"refit": "ls"}\'')
    ap.add_argument("--ppl-file", required=True)
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows at 2048 (and 16x as many at 128)")
    ap.add_argument("--out", default="results/layer-swap.json")
    ap.add_argument(
        "--eval-dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="perplexity matmul dtype; bfloat16 also reports agg16/tokrel16 (layer error in it)",
    )
    ap.add_argument(
        "--compute-dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="matmul dtype of the dense capture and the refit (float32 where the CPU lacks bf16)",
    )
    ap.add_argument("--fisher-cache", default=None, help="load/save the layers' Fisher matrices here (.pt)")
    ap.add_argument(
        "--fisher-ids",
        default=None,
        help="token ids (n, seq_len) .pt to compute the Fisher on "
        "instead of the calibration windows, e.g. text sampled from the dense model (true Fisher)",
    )
    ap.add_argument(
        "--token-nll",
        default=None,
        help="dir: save per-token NLL at 2048 of the dense model and each variant (token_loss_split.py reads them)",
    )
    args = ap.parse_args()
    model, tok, path = load_model(args.model)
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    dense = {i: adapter.read_mlp(layers[i]).to(dtype=torch.float32) for i in args.layers}
    text = load_text(args.ppl_file)
    text_ids = tokenize(tok, text)
    windows = min(args.windows, text_ids.numel() // 2048)  # a short text (held-out Botchan) has fewer
    if windows == 0:
        raise SystemExit(f"{args.ppl_file}: {text_ids.numel()} tokens, fewer than one window of 2048")
    eval_ids = text_ids[: min(8, windows) * 2048].view(-1, 2048)  # layer metrics on <= 8 windows of 2048
    nll_ids = text_ids[: windows * 2048].view(windows, 2048)  # the ppl@2048 windows
    calib = calibration_tokens(tok, CalibrationConfig())
    compute = getattr(torch, args.compute_dtype)
    xs, hs = capture_dense(model, adapter, calib, args.layers, outputs=True, dtype=compute)
    wx, wh = capture_dense(model, adapter, eval_ids, args.layers, outputs=True, dtype=compute)
    uses_metric = any({"metric", "metric_refit"} & json.loads(v).keys() for v in args.variants)
    fisher_ids = torch.load(args.fisher_ids) if args.fisher_ids else calib
    fisher = fisher_for(model, adapter, fisher_ids, args) if uses_metric else None
    nll_dir = Path(args.token_nll) if args.token_nll else None
    if nll_dir is not None:
        nll_dir.mkdir(parents=True, exist_ok=True)
        torch.save(token_nll(model, nll_ids), nll_dir / "dense.pt")

    def ppl_at_2048_and_128() -> dict[int, float]:
        return {
            n: perplexity(
                model,
                tok,
                text,
                n,
                batch_size=2 * 2048 // n,
                dtype=getattr(torch, args.eval_dtype),
                max_windows=windows * 2048 // n,
                progress=False,
            ).perplexity
            for n in (2048, 128)
        }

    ppl = ppl_at_2048_and_128()
    print(f"{'dense':44s} ppl@2048 {ppl[2048]:.3f} ppl@128 {ppl[128]:.3f} ({windows} windows)", flush=True)
    rows = [dict(variant="dense", ppl2048=ppl[2048], ppl128=ppl[128])]
    for spec in args.variants:
        overrides = json.loads(spec)
        mode = overrides.pop("weighting", "none")
        sample_first = overrides.pop("sample_first", False)
        if "input_noise" in overrides:  # the name of earlier results' rows
            overrides["refit_input_noise"] = overrides.pop("input_noise")
        metric_refit_only = "metric_refit" in overrides
        ridge = overrides.pop("metric_refit" if metric_refit_only else "metric", None)
        cfg = SolverConfig(**overrides)
        t0, per_layer = time.perf_counter(), {}
        for i in args.layers:
            x, d, w = xs[i], dense[i], token_weights(mode, hs[i])
            pos = sample_token_positions(x.shape[0], cfg.refit_tokens, 0) if cfg.needs_sample else None
            if pos is not None and sample_first:
                pos = torch.cat([pos, torch.arange(0, x.shape[0], calib.shape[1])]).unique()  # sorted
            metric = None if ridge is None else OutputMetric.from_fisher(fisher[i], ridge)
            res = solve(d, x, w, int(round(args.sparsity * d.width)), cfg, pos, metric, metric_refit_only, compute)
            adapter.write_mlp(layers[i], res.weights)
            with torch.no_grad():
                y = d(wx[i])
                y2, h2 = y.pow(2).sum(), wh[i].pow(2).sum(-1)
                diff = y - res.weights(wx[i])
                e = diff.pow(2).sum(-1)
                rel = e / h2
                by_position = rel.view(eval_ids.shape)
                u = (diff / h2.sqrt()[:, None]).view(*eval_ids.shape, -1)[:, 1:]  # e_n / ||h_n||, sinks left out
                per_layer[i] = dict(
                    agg=float(e.sum() / y2),
                    tokrel=float(rel.mean()),
                    first=float(by_position[:, 0].mean()),
                    refit_accepted=res.refit_accepted,
                    p99=float(rel.quantile(0.99)),
                    p999=float(rel.quantile(0.999)),
                    late=float(by_position[:, 1024:].mean()),
                    common=float(u.flatten(0, 1).mean(0).pow(2).sum()),
                    wincommon=float(u.mean(1).pow(2).sum(-1).mean()),
                )
                if args.eval_dtype != "float32":  # the same error with weights and inputs rounded to it
                    low = getattr(torch, args.eval_dtype)
                    e16 = (y - res.weights.to(dtype=low)(wx[i].to(low)).float()).pow(2).sum(-1)
                    per_layer[i].update(agg16=float(e16.sum() / y2), tokrel16=float((e16 / h2).mean()))
        seconds = time.perf_counter() - t0
        if nll_dir is not None:
            torch.save(dict(token_nll(model, nll_ids), variant=spec), nll_dir / f"variant{len(rows) - 1}.pt")
        ppl = ppl_at_2048_and_128()
        for i in args.layers:
            adapter.write_mlp(layers[i], dense[i])
        metrics = [
            m
            for m in ("agg", "tokrel", "first", "p99", "p999", "late", "common", "wincommon", "agg16", "tokrel16")
            if m in per_layer[args.layers[0]]
        ]
        mean = {m: sum(v[m] for v in per_layer.values()) / len(per_layer) for m in metrics}
        rows.append(dict(variant=spec, ppl2048=ppl[2048], ppl128=ppl[128], **mean, layers=per_layer, seconds=seconds))
        print(
            f"{spec:44s} ppl@2048 {ppl[2048]:.3f} ppl@128 {ppl[128]:.3f} agg {mean['agg']:.4f} "
            f"tokrel {mean['tokrel']:.5f} first {mean['first']:.5f} p99 {mean['p99']:.5f} p999 {mean['p999']:.5f} "
            f"late {mean['late']:.5f} common {mean['common']:.2e} wincommon {mean['wincommon']:.2e} ({seconds:.0f}s)",
            flush=True,
        )
        print(
            f"    per layer ({', '.join(metrics)}):",
            {i: tuple(round(v[m], 5) for m in metrics) for i, v in per_layer.items()},
        )
        rejected = [i for i, v in per_layer.items() if v["refit_accepted"] is False]
        if rejected:
            print(f"    refit safeguard restored the closed form in layers {rejected}")
        if "agg16" in mean:
            print(f"    in {args.eval_dtype}: agg {mean['agg16']:.4f} tokrel {mean['tokrel16']:.5f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        model=path,
        layers=args.layers,
        sparsity=args.sparsity,
        windows=windows,
        machine=machine(),
        ppl_file=args.ppl_file,
        fisher_ids=args.fisher_ids,
    )
    Path(args.out).write_text(json.dumps(dict(meta, rows=rows), indent=2))


if __name__ == "__main__":
    main()
