"""Test setup: the real kernels everywhere, of both backends.

Without CUDA, TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors (it must be set
before triton defines them, i.e. before bnkernels' Triton module is imported), and
BNKERNELS_CUDA_EMULATE=1 runs csrc/'s CUDA C++ kernels on CPU tensors through their
emulation build. BNKERNELS_BACKEND is forced to `triton` so that a silent fallback to the
plain-torch path is an error; the `kernel_backend` fixture runs a test once per kernel
backend (the parity suites use it).
"""
import functools
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["BNKERNELS_CUDA_EMULATE"] = "1"
os.environ.setdefault("BNKERNELS_BACKEND", "triton")


def _usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 quota
    ("<quota> <period>", or "max" for none). os.cpu_count() counts the host's cores, which
    in a container can be many times the ones it gets."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _share_the_cores_among_workers() -> None:
    """Under pytest-xdist each worker gets cores / workers intra-op threads, and so do the
    scripts the tests start (OMP_NUM_THREADS, inherited). torch's default is every core per
    process: with two workers on CI's two cores, each worker's OpenMP threads spin waiting
    for a core the other holds, and small CPU ops run many times slower (the paper
    experiments took 176 s beside another worker, 15 s alone). A thread count set by the
    user is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, _usable_cores() // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


_share_the_cores_among_workers()

import pytest  # noqa: E402


def _interpreter_rounds_bfloat16_like_a_gpu() -> None:
    """triton's interpreter (3.9) casts float32 to bfloat16 by truncating the mantissa; a
    GPU's cvt.rn.bf16.f32 rounds to nearest even. Truncation is up to one bf16 ulp (2^-7
    relative) off where rounding is at most half of one (2^-8), so it would hide a kernel
    that rounds wrong behind the loose tolerance it needs. The tests patch the interpreter
    to round as the GPU does (torch's own float32 -> bfloat16 conversion rounds to nearest
    even too), and compare bfloat16 results at the tolerance a correctly rounding kernel
    meets (helpers.TOL). test_numerics checks that the patch is in force."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    truncating = getattr(builder, "cast_impl", None)
    if truncating is None or getattr(builder, "_bnkernels_rounds_bf16", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            as_bf16 = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            data = as_bf16.view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(data.reshape(src.data.shape), dst_type.scalar)
        return truncating(self, src, dst_type)

    builder.cast_impl = cast_impl  # create_fp_trunc and the other casts go through it
    builder._bnkernels_rounds_bf16 = True


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_rounds_bfloat16_like_a_gpu()
    # work the interpreter throws away, skipped (interpreter_skips.py says what and why)
    import interpreter_skips
    INTERPRETER_SKIPS = (interpreter_skips.skip_dropped_overflow_checks(),
                         interpreter_skips.patch_the_language_once_per_launch())

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]
KERNEL_BACKENDS = ["triton", "cuda"]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@functools.lru_cache(maxsize=None)
def cuda_toolkit_missing() -> bool:
    """No toolkit to build csrc/ with: nvcc on a GPU machine, the CUDA headers on CPU."""
    from bnkernels.backends.cuda import build as cuda_build
    if torch.cuda.is_available():
        return cuda_build.find_nvcc() is None
    return cuda_build.cuda_include_dir() is None


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request, monkeypatch):
    """BNKERNELS_BACKEND for the test; cuda is skipped, saying why, only where there is no
    toolkit to build csrc/ with (a build that fails is an error, not a skip)."""
    if request.param == "cuda" and cuda_toolkit_missing():
        pytest.skip("no CUDA toolkit to build csrc/ with")
    monkeypatch.setenv("BNKERNELS_BACKEND", request.param)
    return request.param


# A per-test timeout where BNKERNELS_TEST_TIMEOUT is set (bench/gpu_suite.py sets it): a
# hung test fails with a TimeoutError instead of eating the GPU run's time. SIGALRM, so
# it needs no plugin; only on the main thread, where signals are delivered.
_TEST_TIMEOUT = int(os.environ.get("BNKERNELS_TEST_TIMEOUT", "0") or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    import signal
    import threading
    if not _TEST_TIMEOUT or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _expired(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran past BNKERNELS_TEST_TIMEOUT={_TEST_TIMEOUT} s")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.alarm(_TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
