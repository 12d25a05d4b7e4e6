#!/usr/bin/env bash
# Every GPU benchmark case in one call (benchmarks/gpu_suite.py; about 5 min on an H100, within 8 min).
#
#   bash benchmarks/gpu_suite.sh                       # results in $OUT (default ./bench-out)
#   bash benchmarks/gpu_suite.sh --smoke               # seconds, on any machine (CPU: CUDA-only parts skipped)
#   bash benchmarks/gpu_suite.sh --compile-in-graph    # + rows for train --compile (compile inside the graph)
#
# Needs python3 with torch, torchvision and timm; no internet, no install (the script imports this checkout).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OUT="${OUT:-./bench-out}"
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && ! python3 -c "import torch" 2>/dev/null; then
    PY=.venv/bin/python
fi
echo "gpu_suite: $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'), OUT=$OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" benchmarks/gpu_suite.py --out "$OUT" "$@"
