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

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["BNKERNELS_CUDA_EMULATE"] = "1"
os.environ.setdefault("BNKERNELS_BACKEND", "triton")

import pytest  # noqa: E402

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]
KERNEL_BACKENDS = ["triton", "cuda"]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@functools.lru_cache(maxsize=None)
def cuda_toolkit_missing() -> bool:
    """No toolkit to build csrc/ with: nvcc on a GPU machine, the CUDA headers on CPU."""
    from bnkernels import cuda_build
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
