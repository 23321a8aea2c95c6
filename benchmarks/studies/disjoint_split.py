"""Write the part of an evaluation text that follows its evaluated prefix, for in-domain calibration.

The quality tables score the first ``--skip-tokens`` tokens of WikiText-2 test (``--max-tokens``
65,536).  This keeps ``--margin`` more tokens out and writes the rest, decoded, as a plain text file
that ``--calib FILE`` takes: calibration from the evaluation *domain* with no evaluated token in it.
(``../shared/data`` has no WikiText-2 train split.)  A diagnostic, not a protocol to report as the
paper's: the paper calibrates on C4 and evaluates on WikiText-2.

    python benchmarks/studies/disjoint_split.py --text ../shared/data/wikitext-2-raw/wiki.test.raw \
        --skip-tokens 65536 --out /tmp/wikitext-test-tail.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoTokenizer

from spap.io.calibration import read_text_file, tokenize
from spap.io.models import resolve_model


def tail_after(tokenizer, text: str, skip_tokens: int, margin: int) -> tuple[str, int, int]:
    """(decoded tokens [skip_tokens + margin, T) of ``text``, start index, T); errors if none are left."""
    ids = tokenize(tokenizer, text)
    start = skip_tokens + margin
    if start >= ids.numel():
        raise ValueError(f"text has {ids.numel()} tokens, none left after {start}")
    return tokenizer.decode(ids[start:], skip_special_tokens=True), start, ids.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="tokenizer's checkpoint (default: embedded SmolLM2-135M)")
    ap.add_argument("--text", required=True, help="evaluation text file (wiki.*.raw gets the WikiText layout)")
    ap.add_argument("--skip-tokens", type=int, required=True, help="evaluated prefix, in tokens")
    ap.add_argument("--margin", type=int, default=2048, help="extra tokens left out after the prefix")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    try:
        tail, start, total = tail_after(tokenizer, read_text_file(args.text), args.skip_tokens, args.margin)
    except ValueError as exc:
        raise SystemExit(f"{args.text}: {exc}") from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(tail, encoding="utf-8")
    print(f"{args.text}: {total} tokens; wrote tokens {start}.. ({total - start}) to {out}")


if __name__ == "__main__":
    main()
