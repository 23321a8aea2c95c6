"""Where does one variant's perplexity differ from another's?  Splits the per-token NLL saved by
``layer_swap.py --token-nll DIR`` by position and by whether the token could be copied from context.

    python benchmarks/studies/token_loss_split.py DIR --base 0 --other 1 [--out results/x.json]

For the token predicted at position t+1 of a window (loss nll[t]):
  copyable  = the bigram (ids[t], ids[t+1]) already occurred at positions <= t of the window
              (an induction head could copy it); else "not copyable"
  position  = t + 1, in buckets [1, 128), [128, 512), [512, 1024), [1024, seq_len)
Prints, per group, the token count, the mean NLL of the dense model, of both variants, and
other - base (mean and sum in nats; exp(sum / N_all) is the perplexity ratio it contributes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def copyable_bigrams(ids: torch.Tensor) -> torch.Tensor:
    """(W, S - 1) bool: the bigram ending at position t + 1 occurred earlier in the same window."""
    out = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
    for w, row in enumerate(ids.tolist()):
        seen: set[tuple[int, int]] = set()
        for t in range(len(row) - 1):
            bigram = (row[t], row[t + 1])
            out[w, t] = bigram in seen
            seen.add(bigram)
    return out


def groups(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    copy = copyable_bigrams(ids)
    pos = torch.arange(1, ids.shape[1]).expand(ids.shape[0], -1)
    out = {"all": torch.ones_like(copy)}
    edges = [1, 128, 512, 1024, ids.shape[1]]
    for lo, hi in zip(edges, edges[1:]):
        out[f"pos {lo}-{hi}"] = (pos >= lo) & (pos < hi)
    out["copyable"], out["not copyable"] = copy, ~copy
    for lo, hi in ((1, 128), (128, ids.shape[1])):
        band = (pos >= lo) & (pos < hi)
        out[f"copyable, pos {lo}-{hi}"], out[f"not copyable, pos {lo}-{hi}"] = copy & band, ~copy & band
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--base", type=int, default=0, help="variant index (order of --variants)")
    ap.add_argument("--other", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    args = ap.parse_args()
    root = Path(args.dir)
    dense = torch.load(root / "dense.pt")
    base, other = (torch.load(root / f"variant{i}.pt") for i in (args.base, args.other))
    if not (torch.equal(dense["ids"], base["ids"]) and torch.equal(dense["ids"], other["ids"])):
        raise SystemExit("the NLL files were computed on different tokens")
    print(f"base:  {base['variant']}\nother: {other['variant']}")
    print(f"{'tokens':30s} {'N':>6s} {'dense':>7s} {'base':>7s} {'other':>7s} {'other-base':>11s} {'sum':>8s}")
    rows = []
    for name, mask in groups(dense["ids"]).items():
        diff = (other["nll"] - base["nll"])[mask]
        row = dict(
            group=name,
            tokens=int(mask.sum()),
            dense=float(dense["nll"][mask].mean()),
            base=float(base["nll"][mask].mean()),
            other=float(other["nll"][mask].mean()),
            diff_mean=float(diff.mean()),
            diff_sum=float(diff.sum()),
        )
        rows.append(row)
        print(
            f"{name:30s} {row['tokens']:6d} {row['dense']:7.4f} {row['base']:7.4f} {row['other']:7.4f} "
            f"{row['diff_mean']:+11.5f} {row['diff_sum']:+8.1f}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(dict(base=base["variant"], other=other["variant"], rows=rows), indent=2))


if __name__ == "__main__":
    main()
