#!/usr/bin/env bash
# Installs fedfhe into .venv, then runs ruff, mypy (production packages), buf lint and the default test suite.
# Usage: bash scripts/test.sh [pytest args]   (e.g. -m slow for the full SmolLM2 checks)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install.sh
echo "== ruff"; ruff check .
echo "== mypy"; mypy common coordinator worker fhe_server
echo "== buf lint"
if command -v npx >/dev/null; then
  npx --yes @bufbuild/buf@1.75.0 lint
else
  echo "npx not found: skipping buf lint (the proto regeneration test still runs)"
fi
echo "== pytest"
python -m pytest "$@"
