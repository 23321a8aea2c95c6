#!/usr/bin/env bash
# Issue 2's comparison (spap, spap-no-refit, spap-no-penalty) and the refit on perturbed inputs
# (--refit-input-noise SIGMA) in full-pipeline runs on one calibration sample, one command.
#
#   bash benchmarks/studies/refit_noise_full.sh                        # GPU: self-generated 128 x 2048
#   DEVICE=cpu DTYPE=float32 CALIB=bundled N=128 SIGMAS=1.0 bash benchmarks/studies/refit_noise_full.sh
#
# Environment (defaults in brackets): MODEL [smollm2], PPL [WikiText-2 test], CALIB [self: sampled once
# with sample_text.py into $RESULTS/calib-self-NxSEQ.pt and reused], N [128], SEQ [2048], SIGMAS
# ["1.0"], DEVICE [cuda], DTYPE [float32], EVAL_DTYPE [bfloat16], SEQ_LENS ["2048 128"],
# MAX_TOKENS [65536], WEIGHTING [none; "residual" = --token-weighting residual], NAME [smollm2-refit-noise],
# RESULTS [results], PY [.venv/bin/python].
# Writes $RESULTS/quality-$NAME.json (the three variants) and $RESULTS/quality-$NAME-sigma<SIGMA>.json
# (spap and spap-no-penalty with that sigma; the refit ablation is spap-no-refit either way);
# --resume skips finished rows.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL=${MODEL:-smollm2}
PPL=${PPL:-../shared/data/wikitext-2-raw/wiki.test.raw}
N=${N:-128}
SEQ=${SEQ:-2048}
SIGMAS=${SIGMAS:-"1.0"}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-float32}
EVAL_DTYPE=${EVAL_DTYPE:-bfloat16}
SEQ_LENS=${SEQ_LENS:-"2048 128"}
MAX_TOKENS=${MAX_TOKENS:-65536}
WEIGHTING=${WEIGHTING:-none}
NAME=${NAME:-smollm2-refit-noise}
RESULTS=${RESULTS:-results}
mkdir -p "$RESULTS"

CALIB=${CALIB:-self}
if [ "$CALIB" = self ]; then
    CALIB="$RESULTS/calib-self-${N}x${SEQ}.pt"
    if [ ! -f "$CALIB" ]; then
        model_arg=()
        [ "$MODEL" = smollm2 ] || model_arg=(--model "$MODEL")
        "$PY" benchmarks/sample_text.py "${model_arg[@]}" --n "$N" --seq-len "$SEQ" --seed 0 --batch-size 32 \
            --device "$DEVICE" --out "${CALIB%.pt}"
    fi
fi

common=(--model "$MODEL" --sparsities 0.3 --calib "$CALIB" --n-samples "$N" --seq-len "$SEQ"
        --ppl-file "$PPL" --max-tokens "$MAX_TOKENS" --seq-lens $SEQ_LENS --eval-dtype "$EVAL_DTYPE"
        --out-dir "$RESULTS" --resume --set device="$DEVICE" compute_dtype="$DTYPE" token_weighting="$WEIGHTING")
"$PY" benchmarks/quality.py "${common[@]}" --name "$NAME" --methods spap-no-refit spap spap-no-penalty
for sigma in $SIGMAS; do
    "$PY" benchmarks/quality.py "${common[@]}" --name "$NAME-sigma$sigma" --methods spap spap-no-penalty \
        --solver-set refit_input_noise="$sigma"
done
