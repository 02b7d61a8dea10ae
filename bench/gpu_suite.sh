#!/usr/bin/env bash
# On a GPU machine, in one go: the test suite on the GPU (compiled Triton kernels and the
# CUDA C++ backend, compiled for this GPU on first use), the full BatchNorm benchmark (both
# backends) and its report, host time per call (launch.csv), the fold and training-step
# benchmarks, and compute-sanitizer memcheck/racecheck on both backends, all written to one
# folder, in 8 files (the device tool's limit): env.txt, tests.log (+ sanitizer), bench.log,
# bn.csv, bn.md, launch.csv, fold.csv, train.csv. (bn.png: run report.py on bn.csv after.)
#   bash bench/gpu_suite.sh [OUT_DIR] [extra bench_bn.py args, e.g. --quick]
# OUT_DIR defaults to $OUT (the device tool's folder) or bench/results/gpu_run.
# BNKERNELS_COMMIT names the commit where the tree travels without .git.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results/gpu_run}}
shift || true
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -2
  echo "commit ${BNKERNELS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
} > "$out/env.txt" 2>&1
"$py" -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}
"$py" bench/bench_bn.py --out "$out" "$@" 2>&1 | tee "$out/bench.log"
# the fused epilogues (BN+ReLU, BN+add+ReLU) vs torch's separate ops, appended to bn.csv
"$py" bench/bench_bn.py --out "$out" --ops bnrelu_fwd_train,bnrelu_bwd,bnaddrelu_fwd_train,bnaddrelu_bwd \
  --dtypes bfloat16,float32 --layouts nhwc,nchw "$@" 2>&1 | tee -a "$out/bench.log"
"$py" bench/report.py "$out/bn.csv" && rm -f "$out/bn.png"
"$py" bench/bench_launch.py --out "$out" 2>&1 | tee -a "$out/bench.log"
"$py" bench/bench_fold.py --out "$out" 2>&1 | tee -a "$out/bench.log"
"$py" bench/bench_train.py --out "$out" 2>&1 | tee -a "$out/bench.log"
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 1 "$py" bench/sanitize.py triton,cuda >> "$out/tests.log" 2>&1
  echo "compute-sanitizer $tool exit code: $?" | tee -a "$out/env.txt"
done
echo "tests exit code: $tests_rc" | tee -a "$out/env.txt"
