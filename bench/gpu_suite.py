"""The GPU suite in stages, each one device-tool run that writes its own files into --out.

    python bench/gpu_suite.py STAGES --out DIR [--budget-s S] [--dry-run] [-- extra args
                                                for the stages' bench_bn.py]

STAGES: a stage's name or number, or several joined by commas ("1,2").

  1 env_tests  env.txt, tests.log: the test suite on the GPU (both backends; pytest-xdist
               over the cores where it is installed, a per-test timeout). The files whose
               tests run only on a GPU (GPU_FIRST) go first, in a pytest run of their own,
               so a stage cut short by its budget has still run them.
  2 core       bn.csv, bn.md, bn.png, core.log: bench_bn.py's fwd_train / bwd / fwd_eval
               (extra args, e.g. --quick or --dtypes bfloat16, go to bench_bn.py)
  3 extras     bn.csv, launch.csv, extras.log: the fused epilogues (bfloat16); fwd_train /
               bwd at N = 32 with the persistent pass on and off (bnkernels_triton,
               bnkernels_triton_3k); bench_launch.py
  4 sanitize   sanitize.log: compute-sanitizer memcheck and racecheck on both backends,
               and the over-2^31-element test
  5 ncu        ncu.txt: DRAM throughput, achieved occupancy and stall reasons of the
               shapes the offline read put furthest from the floor (bench/ncu_target.py)
  6 models     train.csv, fold.csv, models.log: bench_train.py (the ResNet-50 training
               step), then bench_fold.py (eager rows first, then torch.compile's); the
               whole-model compiles take minutes, so they have a stage of their own

Every stage prints its time estimate when it starts and its elapsed time when it ends
(also in DIR/stageN.txt, with each command's exit code), keeps what it wrote when a
command fails, and writes at most 8 files, no folder.

The budget: a device session has 15 minutes of GPU time in all, the machine's start
included, and one call at most 10. --budget-s is the wall time the stages named may take
together (default: their estimates x 1.25, at most BUDGET_CAP_S); it is shared in
proportion to the estimates, and what a stage leaves unused goes to the next. A command
still running at its stage's deadline gets SIGINT (pytest then prints its summary so far;
the benchmarks have written each row as it was measured), and SIGKILL 20 s later; its
exit code is then 124 and the stage still writes its summary, so the device call ends
inside its limit with everything that was measured. A first GPU session runs stages 1
and 2 in one call (8 files), timing bfloat16 only:

    python3 bench/gpu_suite.py 1,2 --out $OUT --budget-s 520 -- --dtypes bfloat16

csrc/'s build for sm_90 takes about a minute of nvcc (59 s on this repository's 2-core
machine at cafa679), and a fresh device machine would spend it in every call that uses the
CUDA backend (stages 1 to 5). Built here first, where nvcc is the GPU machine's (13.0), it
travels in an ignored folder instead; the digest in its folder's name keeps a build of
other sources from being loaded:

    BNKERNELS_CACHE_DIR=$PWD/.gpu_carry python -m bnkernels.backends.cuda --arch 90
    (the device call: carry [".gpu_carry"], the command prefixed with
     BNKERNELS_CACHE_DIR=$PWD/.gpu_carry)

--dry-run runs the same plumbing on CPU in seconds: tiny shapes, the Triton interpreter
and csrc/'s emulation build, and the GPU-only tools (nvidia-smi, compute-sanitizer, ncu)
named but not run; the test suite runs it (tests/test_bench_harness.py), so a plumbing
error costs no GPU time.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
STAGES = ["env_tests", "core", "extras", "sanitize", "ncu", "models"]
# Minutes on an H100, estimated (no GPU run has timed them yet); each must stay under 8.
ESTIMATE_MIN = {"env_tests": 6, "core": 7, "extras": 7, "sanitize": 5, "ncu": 5, "models": 7}
BUDGET_CAP_S = 540  # one device call is at most 600 s: the rest is the transfers' margin
STOP_GRACE_S = 20   # SIGINT, then this long to write summaries, then SIGKILL
PER_TEST_TIMEOUT_S = 240  # a whole-ResNet-50 torch.compile test among 16 busy workers
# Test files that only a GPU runs in full (CUDA streams, graphs, L2, the persistent pass's
# barrier, csrc/ built with nvcc): stage 1 runs them first.
GPU_FIRST = ["tests/test_cuda.py", "tests/test_persistent.py", "tests/test_cuda_backend.py"]
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
        # (the dry run: the same two pytest runs, over two small files)
        first = ["tests/test_layout.py"] if dry else GPU_FIRST
        rest = ["tests/test_architecture.py"] if dry else ["tests", *(
            f"--ignore={path}" for path in GPU_FIRST)]
        # (loadgroup, as make test: the tests that share one expensive fixture, the wheel's
        # build, stay on one worker)
        workers = ["-n", "16", "--dist", "loadgroup"] if _has("xdist") and not dry else []
        pytest = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
                  "--durations=15", *workers]
        return [(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                  "--format=csv"], "env.txt", True),
                ([PY, "-c", "import os, torch, triton; print('torch', torch.__version__, 'cuda', "
                  "torch.version.cuda, 'triton', triton.__version__); print('BNKERNELS_CACHE_DIR',"
                  " os.environ.get('BNKERNELS_CACHE_DIR'))"], "env.txt", False),
                (["nvcc", "--version"], "env.txt", True),
                # csrc/ built once, before the workers (each would build it otherwise), or
                # found in BNKERNELS_CACHE_DIR where the call carried a build (stage1.txt
                # gives this command's seconds: about none when it was carried)
                ([PY, "-m", "bnkernels.backends.cuda", *(["--emulate"] if dry else
                                                          ["--arch", "90"])], "env.txt", False),
                ([*pytest, *first], "tests.log", False),
                ([*pytest, *rest], "tests.log", False)]
    smoke = ["--smoke"] if dry else []
    if stage == "core":
        return [([PY, f"{bench}/bench_bn.py", "--out", str(out), *smoke, *extra], "core.log",
                 False),
                ([PY, f"{bench}/report.py", str(out / "bn.csv")], "core.log", False)]
    if stage == "extras":
        return [([PY, f"{bench}/bench_bn.py", "--out", str(out), "--ops", FUSED_OPS,
                  "--dtypes", "bfloat16", "--layouts", "nhwc,nchw", *smoke, *extra],
                 "extras.log", False),
                # the persistent pass (one launch) beside the three kernels, at N = 32,
                # where more of ResNet-50's shapes fit its size rule
                ([PY, f"{bench}/bench_bn.py", "--out", str(out), "--ops", "fwd_train,bwd",
                  "--batch", "32", "--dtypes", "bfloat16", "--layouts", "nhwc,nchw",
                  "--providers", "bnkernels_triton,bnkernels_triton_3k,torch", *smoke, *extra],
                 "extras.log", False),
                ([PY, f"{bench}/bench_launch.py", "--out", str(out), *smoke], "extras.log",
                 False)]
    if stage == "models":
        fold = ["--device", "cpu", "--batches", "1", "--dtypes", "float32", "--modes", "eager",
                "--reps", "1"] if dry else []
        # (torch's BN in the dry run: a ResNet-50 step through the interpreter takes minutes)
        train = ["--device", "cpu", "--batch", "1", "--steps", "1", "--warmup", "0",
                 "--variants", "torch_batchnorm"] if dry else []
        return [([PY, f"{bench}/bench_train.py", "--out", str(out), *train], "models.log",
                 False),
                ([PY, f"{bench}/bench_fold.py", "--out", str(out), *fold], "models.log", False)]
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
    raise ValueError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")


def _run_until(argv, env, log, deadline: float) -> int:
    """argv's exit code; at the deadline SIGINT (its own summary is written), SIGKILL to
    its process group STOP_GRACE_S later, and 124 (timeout(1)'s code)."""
    # its own process group (not a session: a caller that ends this session ends it too);
    # Popen's process_group= is Python 3.11's, and 3.10 makes the group in the child instead
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    # SIGINT must reach the command even where this process ignores it: a shell starts a
    # background job without job control so (`make test &` in a script), and an ignored
    # signal stays ignored across exec, where a caught one is reset to the default
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                **group)
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait(timeout=max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
        pass
    except BaseException:  # this script stopped (SIGTERM, Ctrl-C): its command goes too
        _kill_group(proc)
        raise
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    _kill_group(proc)
    return 124


def _kill_group(proc) -> None:
    """SIGKILL to the leader and whatever it started (pytest-xdist's workers,
    bench_bn.py's compile workers, the sanitizers' targets)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_stage(stage: str, out: Path, dry: bool, extra: list, budget_s: float) -> int:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
               BNKERNELS_TEST_TIMEOUT=str(PER_TEST_TIMEOUT_S))
    if dry:
        env.update(TRITON_INTERPRET="1", BNKERNELS_CUDA_EMULATE="1")
    start = time.monotonic()
    deadline = start + budget_s
    summary = [f"stage {stage}: estimate {ESTIMATE_MIN[stage]} min on an H100, budget "
               f"{budget_s:.0f} s" + (" (dry run on CPU)" if dry else "")]
    print(summary[0], flush=True)
    worst = 0
    try:
        for argv, log_name, gpu_tool in commands(stage, out, dry, extra):
            line = " ".join(shlex.quote(a) for a in argv)
            with open(out / log_name, "a") as log:
                log.write(f"$ {line}\n")
                log.flush()
                if gpu_tool and (dry or shutil.which(argv[0]) is None):
                    log.write(f"(not run: {'dry run' if dry else argv[0] + ' is not installed'})"
                              "\n")
                    summary.append(f"skipped {argv[0]}")
                    continue
                if time.monotonic() >= deadline:
                    log.write(f"(not run: the stage's budget of {budget_s:.0f} s is spent)\n")
                    summary.append(f"not run (budget spent): {line}")
                    worst = worst or 124
                    continue
                summary.append(f"running: {line}")  # replaced by its exit code when it ends
                began = time.monotonic()
                rc = _run_until(argv, env, log, deadline)
                if rc == 124:
                    log.write(f"\n(stopped: the stage's budget of {budget_s:.0f} s ran out)\n")
            summary[-1] = (f"rc {rc}{' (budget ran out)' if rc == 124 else ''} after "
                           f"{time.monotonic() - began:.0f} s: {line}")
            worst = worst or rc
    finally:  # also when the suite itself is stopped (SIGTERM): what ran, and for how long
        summary.append(f"elapsed {time.monotonic() - start:.0f} s")
        (out / f"stage{STAGES.index(stage) + 1}.txt").write_text("\n".join(summary) + "\n")
        print(summary[-1], flush=True)
    return worst


def parse_stages(text: str) -> list:
    """"1,2" or "env_tests,core" -> the stages' names, in the order given."""
    names = []
    for item in text.split(","):
        item = item.strip()
        if item.isdigit() and 1 <= int(item) <= len(STAGES):
            item = STAGES[int(item) - 1]
        if item not in STAGES:
            raise SystemExit(f"unknown stage {item!r}: one of {', '.join(STAGES)} (or 1 to "
                             f"{len(STAGES)}), several joined by commas")
        names.append(item)
    return names


def default_budget_s(stages) -> float:
    return min(sum(ESTIMATE_MIN[s] for s in stages) * 60 * 1.25, BUDGET_CAP_S)


def run_stages(stages, out: Path, dry: bool, extra: list, budget_s: float) -> int:
    """Each stage in turn, within budget_s in all: a stage gets the time left in
    proportion to its estimate among the stages left (so one that ends early gives its
    time to the next)."""
    end = time.monotonic() + budget_s
    worst = 0
    for i, stage in enumerate(stages):
        left = [ESTIMATE_MIN[s] for s in stages[i:]]
        share = (end - time.monotonic()) * left[0] / sum(left)
        worst = run_stage(stage, out, dry, extra, max(share, 0)) or worst
    return worst


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through _run_until, which kills its command


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stages", help=f"{', '.join(STAGES)}, or its number; several "
                        "joined by commas")
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ.get("OUT", "bench/results/gpu_run")))
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall time for the stages named, together (default: their "
                        f"estimates x 1.25, at most {BUDGET_CAP_S} s)")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    stages = parse_stages(args.stages)
    budget = default_budget_s(stages) if args.budget_s is None else args.budget_s
    return run_stages(stages, args.out, args.dry_run, extra, budget)


if __name__ == "__main__":
    sys.exit(main())
