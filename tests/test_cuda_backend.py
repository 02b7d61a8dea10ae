"""The CUDA C++ backend's own behaviour. Its parity with torch and float64 runs in the shared
suites (test_batch_norm, test_numerics, test_fused_epilogue, test_sync_batch_norm: the
kernel_backend fixture); here: which kernels each path launches, the split path against the
one-block path, the GPU's block size, determinism, the ABI check, the auto rule, and the
errors. On CPU the kernels run through the emulation build (BNKERNELS_CUDA_EMULATE=1)."""
import collections
import ctypes
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import bnkernels
from bnkernels import backends
from bnkernels.backends.cuda import build as cuda_build
from bnkernels.backends.cuda import library as cuda_library
from bnkernels.backends.cuda import plan as cuda_plan
from conftest import cuda_toolkit_missing
from helpers import (TOL, assert_close_scaled, float64_reference, kernels_only, make_input,
                     random_params)

pytestmark = pytest.mark.skipif(cuda_toolkit_missing(), reason="no CUDA toolkit to build csrc/")


@pytest.fixture(autouse=True)
def cuda_backend(monkeypatch):
    monkeypatch.setenv("BNKERNELS_BACKEND", "cuda")


@pytest.fixture
def many_splits(monkeypatch):
    """Every channel's rows split over several blocks: partials, merge, then the
    elementwise kernel (a GPU does this for few channels over many rows)."""
    monkeypatch.setattr(cuda_plan, "EMULATED_BLOCKS", 64)
    monkeypatch.setattr(cuda_plan, "CUDA_BLOCKS_PER_SM", 1024)
    monkeypatch.setattr(cuda_plan, "CUDA_MIN_ROWS_PER_LANE", 1)


@pytest.fixture
def one_block(monkeypatch):
    """Every channel's rows in one block: statistics then the elementwise pass, one kernel."""
    monkeypatch.setattr(cuda_plan, "CUDA_MIN_ROWS_PER_LANE", 2**40)


def _counts():
    return collections.Counter(cuda_library.launch_counts())


def _train_step(x, params, activation=None, residual=None, training=True):
    """y, the gradients of x, weight, bias (and residual), and the running statistics."""
    w, b, rm, rv = (t.clone() for t in params)
    leaves = [x.detach().requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True)]
    if residual is not None:
        leaves.append(residual.detach().requires_grad_(True))
    with kernels_only():
        y = bnkernels.batch_norm(leaves[0], rm, rv, w, b, training=training,
                                 activation=activation,
                                 residual=leaves[3] if residual is not None else None)
        grads = torch.autograd.grad(y, leaves, make_input(x.shape, x.dtype, x.device, seed=9))
    return (y, *grads, rm, rv)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_each_path_launches_its_kernels(split, training, device, request):
    request.getfixturevalue("many_splits" if split else "one_block")
    x = make_input((4, 3, 20, 20), torch.float32, device, loc=1.0)
    assert (cuda_plan.block_plan(4, 3, 400, False, x.device).splits > 1) == split
    before = _counts()
    _train_step(x, random_params(3, torch.float32, device), training=training)
    launched = dict(_counts() - before)
    if not training:  # normalize; then the weight's sums and dx together (one block)
        expected = {"apply": 1, "fused": 1} if not split else {"apply": 2, "reduce": 1, "merge": 1}
    elif split:  # per pass: partials, merge, elementwise
        expected = {"reduce": 2, "merge": 2, "apply": 2}
    else:  # per pass: one kernel, statistics then elementwise
        expected = {"fused": 2}
    assert launched == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
def test_split_path_matches_one_block_path(dtype, x_layout, device, monkeypatch):
    x = make_input((5, 4, 11, 13), dtype, device, x_layout, loc=3.0, scale=2.0)
    r = make_input((5, 4, 11, 13), dtype, device, seed=4)
    params = random_params(4, dtype, device)
    channels_fast = x_layout == "channels_last"
    with monkeypatch.context() as patch:
        patch.setattr(cuda_plan, "CUDA_MIN_ROWS_PER_LANE", 2**40)
        assert cuda_plan.block_plan(5, 4, 143, channels_fast, x.device).splits == 1
        one = _train_step(x, params, "silu", r)
    monkeypatch.setattr(cuda_plan, "EMULATED_BLOCKS", 64)
    monkeypatch.setattr(cuda_plan, "CUDA_MIN_ROWS_PER_LANE", 1)
    assert cuda_plan.block_plan(5, 4, 143, channels_fast, x.device).splits > 1
    split = _train_step(x, params, "silu", r)
    tol = (1e-12, 1e-12) if dtype == torch.float64 else TOL[torch.float32]
    for a, b in zip(one, split):  # the sums (dweight, dbias) add in another order
        assert_close_scaled(a, b, tol)


@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last", "channel_slice"])
@pytest.mark.parametrize("split", [False, True])
def test_the_gpus_block_size(x_layout, split, device, monkeypatch, request):
    """The emulation runs 64-thread blocks by default (fibers are cheap few); a GPU runs
    256: the same code at the GPU's block shape, against float64."""
    if split:
        request.getfixturevalue("many_splits")
    monkeypatch.setattr(cuda_plan, "EMULATED_BLOCK_THREADS", cuda_plan.CUDA_BLOCK_THREADS)
    x = make_input((6, 5, 16, 15), torch.float32, device, x_layout, loc=-2.0, scale=3.0)
    w, b, rm, rv = random_params(5, torch.float32, device)
    plan = cuda_plan.block_plan(6, 5, 240, x_layout == "channels_last", x.device)
    assert plan.threads == 256 and (plan.splits > 1 or not split)
    y, dx, *_ = _train_step(x, (w, b, rm, rv))
    x64 = x.double().requires_grad_(True)
    y64 = float64_reference(x64, w, b, None, None, True)[0]
    assert_close_scaled(y, y64, TOL[torch.float32])
    g = make_input(x.shape, x.dtype, x.device, seed=9)
    (dx64,) = torch.autograd.grad(torch.nn.functional.batch_norm(
        x64, None, None, w.double(), b.double(), True), x64, g.double())
    assert_close_scaled(dx, dx64, tuple(2 * t for t in TOL[torch.float32]))


def test_bitwise_deterministic(device, many_splits):
    x = make_input((8, 6, 12, 12), torch.float32, device, "channels_last", loc=0.5)
    params = random_params(6, torch.float32, device)
    first, second = _train_step(x, params, "gelu"), _train_step(x, params, "gelu")
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_the_abi_mirror_is_checked(device, monkeypatch):
    lib = cuda_library.library(torch.device(device))
    cuda_library._check_abi(lib)  # what loading does

    class Shorter(ctypes.Structure):
        _fields_ = cuda_library.BnkCall._fields_[:-1]

    monkeypatch.setattr(cuda_library, "BnkCall", Shorter)
    with pytest.raises(RuntimeError, match="BnkCall differs"):
        cuda_library._check_abi(lib)


def test_an_invalid_call_is_refused_not_run(device):
    lib = cuda_library.library(torch.device(device))
    call = cuda_library.BnkCall()  # all zeros: no tensor, no plan
    code = lib.bnk_forward(ctypes.byref(call))
    assert code != 0 and b"invalid BnkCall" in lib.bnk_error_string(code)


def test_cpu_tensors_need_the_emulation(device, monkeypatch):
    if device != "cpu":
        pytest.skip("about CPU tensors")
    monkeypatch.setenv("BNKERNELS_CUDA_EMULATE", "0")
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match="needs CUDA tensors, or BNKERNELS_CUDA_EMULATE=1"):
        bnkernels.batch_norm(torch.randn(4, 3), rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_callers_wanting_one_build_compile_it_once(monkeypatch, tmp_path):
    """Two callers of build_cached at once, as pytest's workers are (processes there;
    threads here, each opening the lock file on its own, which flock treats the same): the
    second waits on the lock and takes the first's library instead of compiling another."""
    import threading
    import time
    monkeypatch.setenv("BNKERNELS_CACHE_DIR", str(tmp_path))
    compiled = []

    def slow_compile(out, build, log=None):
        compiled.append(out)
        time.sleep(0.5)  # the other caller arrives meanwhile
        out.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        out.write_bytes(b"lib")
        return out

    monkeypatch.setattr(cuda_build, "compile_to", slow_compile)
    monkeypatch.setattr(cuda_build, "emulation_build", lambda: None)
    got = []
    callers = [threading.Thread(target=lambda: got.append(cuda_build.build_cached("emulate")))
               for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(compiled) == 1 and got == [cuda_build.cached_path("emulate")] * 2


def test_a_failed_build_is_a_clear_error(device, monkeypatch, tmp_path):
    if device != "cpu":
        pytest.skip("breaks the emulation build")
    monkeypatch.setenv("BNKERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(cuda_library, "_BY_DEVICE", {})
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match="CUDA C\\+\\+ backend is not available: .*"
                                           "no-such-compiler could not be run"):
        bnkernels.batch_norm(torch.randn(4, 3), rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_import_builds_and_loads_nothing(tmp_path):
    code = ("import sys, bnkernels, torch; bnkernels.BatchNorm2d(3)(torch.randn(2, 3, 4, 4)); "
            "print('bnkernels.backends.cuda.library' in sys.modules)")
    env = {"BNKERNELS_CACHE_DIR": str(tmp_path), "BNKERNELS_BACKEND": "torch", "PATH": "/usr/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=str(cuda_build.CHECKOUT_CSRC.parent))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False" and not any(tmp_path.iterdir())


@pytest.mark.parametrize("numel,built,expected", [
    (backends.AUTO_CUDA_MAX_NUMEL, True, "cuda"),
    (backends.AUTO_CUDA_MAX_NUMEL + 1, True, "triton"),
    (64, False, "triton"),  # auto never starts a compile
])
def test_auto_rule_on_cuda_tensors(numel, built, expected, monkeypatch):
    monkeypatch.setenv("BNKERNELS_BACKEND", "auto")
    monkeypatch.setattr(cuda_library, "is_built", lambda device: built)
    fake = SimpleNamespace(device=torch.device("cuda", 0), numel=lambda: numel)
    assert backends.select(fake).name == expected


def test_auto_on_cpu_never_picks_the_emulation(monkeypatch):
    monkeypatch.setenv("BNKERNELS_BACKEND", "auto")
    assert backends.select(torch.randn(2, 3)).name == "triton"


def test_prebuilt_library_is_used_only_when_current(monkeypatch, tmp_path):
    lib, digest = tmp_path / cuda_build.LIB_NAME, tmp_path / "lib.digest"
    monkeypatch.setattr(cuda_build, "PREBUILT", lib)
    monkeypatch.setattr(cuda_build, "PREBUILT_DIGEST", digest)
    assert not cuda_build.prebuilt_is_current()
    lib.write_bytes(b"")
    digest.write_text("stale\n")
    assert not cuda_build.prebuilt_is_current()  # built from other sources
    digest.write_text(cuda_build.source_digest() + "\n")
    assert cuda_build.prebuilt_is_current()


@pytest.mark.skipif(cuda_build.find_nvcc() is None, reason="nvcc is not installed")
def test_setup_builds_for_sm80_sm90_and_ptx(tmp_path):
    build = cuda_build.gpu_build(cuda_build.SETUP_ARCHS, ptx=True)
    command = " ".join(build.compile(cuda_build.translation_units()[0], tmp_path / "x.o")
                       + build.link([tmp_path / "x.o"], tmp_path / "x.so"))
    for target in ("arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90",
                   "arch=compute_90,code=compute_90"):
        assert target in command


def test_the_build_command_runs():
    """`python -m bnkernels.backends.cuda --emulate` in the checkout prints where the cached
    build is (the suite's own, built by the first process to need it; test_wheel runs the
    command where it has to build, from a wheel's sources)."""
    env = {"BNKERNELS_CACHE_DIR": str(cuda_build.cache_dir()), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "bnkernels.backends.cuda", "--emulate"],
                          capture_output=True, text=True, env=env,
                          cwd=str(cuda_build.CHECKOUT_CSRC.parent))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(cuda_build.cached_path("emulate"))
    assert Path(done.stdout.strip()).is_file()
    assert not done.stderr  # (no runpy warning: the entry point is the package's __main__)
