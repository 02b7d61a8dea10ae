#!/usr/bin/env bash
# The GPU suite, all six stages of bench/gpu_suite.py one after another into one folder
# (on the device tool, run one stage per call instead: each fits its time limit).
#   bash bench/gpu_suite.sh [OUT_DIR] [--dry-run]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results/gpu_run}}
shift || true
rc=0
for stage in 1 2 3 4 5 6; do
  "${PYTHON:-python3}" bench/gpu_suite.py "$stage" --out "$out" "$@" || rc=1
done
exit $rc
