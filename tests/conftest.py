"""Test setup: the real Triton kernels everywhere.

Without CUDA, TRITON_INTERPRET=1 runs the kernels on CPU tensors; it must be set before
triton defines them, i.e. before bnkernels' Triton module is imported. BNKERNELS_BACKEND is
forced to `triton` so that a silent fallback to the plain-torch path is an error.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("BNKERNELS_BACKEND", "triton")

import pytest  # noqa: E402

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
