#!/usr/bin/env bash
# On the GPU machine, after receive.sh installed the kit: every GPU figure of issue 28 in one call, the report copied
# to $OUT (the run tool brings that folder back). Arguments go to measure.py (--only speed, --quick, --target portable).
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
OUT="${OUT:-/tmp/neodeploy-gpu-out}"; mkdir -p "$OUT"
python3 scripts/gpu/measure.py "$@" 2>&1 | tee "$OUT/gpu-report.txt"
status=${PIPESTATUS[0]}
cp /tmp/neodeploy-gpu-work/bench-serve-*.json "$OUT/" 2>/dev/null
exit "$status"
