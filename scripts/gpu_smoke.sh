#!/usr/bin/env bash
# GPU smoke test (not part of CI): tiny-config victims and purifiers on CUDA, with timings.
# Usage: bash scripts/gpu_smoke.sh [--device cpu]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  bash scripts/bootstrap.sh
fi
exec timeout 300 .venv/bin/python scripts/gpu_smoke.py "$@"
