#!/usr/bin/env bash
# Installs fedfhe into .venv, then runs a local federation on loopback with the real model.
# Usage: bash scripts/run_local.sh [fedfhe-local args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install.sh
fedfhe-local --model smollm2-135m --workers 3 "$@"
