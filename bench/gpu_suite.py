"""The GPU suite in stages, each one device-tool run that writes its own files into --out.

    python bench/gpu_suite.py STAGE --out DIR [--dry-run] [-- extra args for the stage's bench]

  1 env_tests  env.txt, tests.log: the test suite on the GPU (both backends; pytest-xdist
               over the cores where it is installed, a per-test timeout)
  2 core       bn.csv, bn.md, bn.png, core.log: bench_bn.py's fwd_train / bwd / fwd_eval
               (extra args, e.g. --quick, go to bench_bn.py)
  3 extras     bn.csv (the fused epilogues; fwd_train / bwd at N = 32 with the persistent
               pass on and off: bnkernels_triton, bnkernels_triton_3k), launch.csv, fold.csv, train.csv, extras.log
  4 sanitize   sanitize.log: compute-sanitizer memcheck and racecheck on both backends,
               and the over-2^31-element test
  5 ncu        ncu.txt: DRAM throughput, achieved occupancy and stall reasons of the
               shapes the offline read put furthest from the floor (bench/ncu_target.py)

Every stage prints its time estimate when it starts and its elapsed time when it ends
(also in DIR/stageN.txt, with each command's exit code), keeps what it wrote when a
command fails, and writes at most 8 files, no folder. --dry-run runs the same plumbing on
CPU in seconds: tiny shapes, the Triton interpreter and csrc/'s emulation build, and the
GPU-only tools (nvidia-smi, compute-sanitizer, ncu) named but not run; the test suite
runs it (tests/test_bench_harness.py), so a plumbing error costs no GPU time.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
STAGES = ["env_tests", "core", "extras", "sanitize", "ncu"]
# Minutes on an H100, estimated (no GPU run has timed them yet); each must stay under 8.
ESTIMATE_MIN = {"env_tests": 6, "core": 7, "extras": 8, "sanitize": 5, "ncu": 5}
PER_TEST_TIMEOUT_S = 300
FUSED_OPS = "bnrelu_fwd_train,bnrelu_bwd,bnaddrelu_fwd_train,bnaddrelu_bwd"
# (op, layout, dtype, C, H, W, N): NCHW 14x14 and 7x7, a channels_last merge (N = 128), and
# the persistent pass at N = 32.
NCU_TARGETS = [("fwd_train", "nchw", "bfloat16", 1024, 14, 14, 128),
               ("fwd_train", "nchw", "bfloat16", 2048, 7, 7, 128),
               ("fwd_train", "nhwc", "bfloat16", 64, 56, 56, 128),
               # the persistent one-launch pass (its DRAM bytes: ~2 and ~3 tensor sizes)
               ("fwd_train", "nhwc", "bfloat16", 256, 28, 28, 32),
               ("bwd", "nhwc", "bfloat16", 256, 28, 28, 32)]
NCU_METRICS = ",".join([
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "smsp__average_warp_latency_issue_stalled_long_scoreboard",
    "smsp__average_warp_latency_issue_stalled_barrier",
    "smsp__average_warp_latency_issue_stalled_math_pipe_throttle",
    "gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum"])


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def commands(stage: str, out: Path, dry: bool, extra: list):
    """(argv, log file name, GPU tool) for each command of stage. A GPU tool is not run in
    a dry run: its line is written to the log instead."""
    bench = str(ROOT / "bench")
    if stage == "env_tests":
        tests = ["tests/test_layout.py"] if dry else ["tests"]
        workers = ["-n", "16"] if _has("xdist") and not dry else []
        return [(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                  "--format=csv"], "env.txt", True),
                ([PY, "-c", "import torch, triton; print('torch', torch.__version__, 'cuda', "
                  "torch.version.cuda, 'triton', triton.__version__)"], "env.txt", False),
                (["nvcc", "--version"], "env.txt", True),
                # csrc/ built once, before the workers (each would build it otherwise)
                ([PY, "-m", "bnkernels.backends.cuda", *(["--emulate"] if dry else
                                                          ["--arch", "90"])], "env.txt", False),
                ([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers, *tests],
                 "tests.log", False)]
    smoke = ["--smoke"] if dry else []
    if stage == "core":
        return [([PY, f"{bench}/bench_bn.py", "--out", str(out), *smoke, *extra], "core.log",
                 False),
                ([PY, f"{bench}/report.py", str(out / "bn.csv")], "core.log", False)]
    if stage == "extras":
        fold = ["--device", "cpu", "--batches", "1", "--dtypes", "float32", "--modes", "eager",
                "--reps", "1"] if dry else []
        # (torch's BN in the dry run: a ResNet-50 step through the interpreter takes minutes)
        train = ["--device", "cpu", "--batch", "1", "--steps", "1", "--warmup", "0",
                 "--variants", "torch_batchnorm"] if dry else []
        return [([PY, f"{bench}/bench_bn.py", "--out", str(out), "--ops", FUSED_OPS,
                  "--dtypes", "bfloat16,float32", "--layouts", "nhwc,nchw", *smoke, *extra],
                 "extras.log", False),
                # the persistent pass (one launch) beside the three kernels, at N = 32,
                # where more of ResNet-50's shapes fit its size rule
                ([PY, f"{bench}/bench_bn.py", "--out", str(out), "--ops", "fwd_train,bwd",
                  "--batch", "32", "--dtypes", "bfloat16", "--layouts", "nhwc,nchw",
                  "--providers", "bnkernels_triton,bnkernels_triton_3k,torch", *smoke, *extra],
                 "extras.log", False),
                ([PY, f"{bench}/bench_launch.py", "--out", str(out), *smoke], "extras.log",
                 False),
                ([PY, f"{bench}/bench_fold.py", "--out", str(out), *fold], "extras.log", False),
                ([PY, f"{bench}/bench_train.py", "--out", str(out), *train], "extras.log",
                 False)]
    if stage == "sanitize":
        run = [PY, f"{bench}/sanitize.py", "triton,cuda", *smoke]
        cmds = [(["compute-sanitizer", "--tool", tool, "--error-exitcode", "1", *run],
                 "sanitize.log", True) for tool in ("memcheck", "racecheck")]
        if dry:
            cmds.append((run, "sanitize.log", False))  # what the sanitizer would run
        big = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py", "-k",
               "more_than_2_to_31"]
        return cmds + [(big, "sanitize.log", False)]
    if stage == "ncu":
        cmds = []
        for op, layout, dtype, c, h, w, n in NCU_TARGETS:
            target = [PY, f"{bench}/ncu_target.py", op, layout, dtype, str(c), str(h), str(w),
                      "--batch", str(n), *(["--smoke"] if dry else [])]
            cmds.append((["ncu", "--metrics", NCU_METRICS, "--target-processes", "all",
                          "-k", "regex:_kernel", *target], "ncu.txt", True))
            if dry:
                cmds.append((target, "ncu.txt", False))
        return cmds
    raise ValueError(f"unknown stage {stage!r}: one of {', '.join(STAGES)} (or 1 to 5)")


def run_stage(stage: str, out: Path, dry: bool, extra: list) -> int:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
               BNKERNELS_TEST_TIMEOUT=str(PER_TEST_TIMEOUT_S))
    if dry:
        env.update(TRITON_INTERPRET="1", BNKERNELS_CUDA_EMULATE="1")
    start = time.monotonic()
    summary = [f"stage {stage}: estimate {ESTIMATE_MIN[stage]} min on an H100"
               + (" (dry run on CPU)" if dry else "")]
    print(summary[0], flush=True)
    worst = 0
    for argv, log_name, gpu_tool in commands(stage, out, dry, extra):
        line = " ".join(shlex.quote(a) for a in argv)
        with open(out / log_name, "a") as log:
            log.write(f"$ {line}\n")
            log.flush()
            if gpu_tool and (dry or shutil.which(argv[0]) is None):
                log.write(f"(not run: {'dry run' if dry else argv[0] + ' is not installed'})\n")
                summary.append(f"skipped {argv[0]}")
                continue
            rc = subprocess.run(argv, cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT).returncode
        summary.append(f"rc {rc}: {line}")
        worst = worst or rc
    summary.append(f"elapsed {time.monotonic() - start:.0f} s")
    (out / f"stage{STAGES.index(stage) + 1}.txt").write_text("\n".join(summary) + "\n")
    print(summary[-1], flush=True)
    return worst


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", help=f"{', '.join(STAGES)}, or its number")
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ.get("OUT", "bench/results/gpu_run")))
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    stage = STAGES[int(args.stage) - 1] if args.stage.isdigit() else args.stage
    return run_stage(stage, args.out, args.dry_run, extra)


if __name__ == "__main__":
    sys.exit(main())
