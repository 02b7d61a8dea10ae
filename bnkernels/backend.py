"""Which implementation runs a call: BNKERNELS_BACKEND = auto | triton | torch.

  auto    the Triton kernels on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1
          (the interpreter); the plain-PyTorch path (reference.py) everywhere else.
  triton  the Triton kernels, or a clear error where they cannot run.
  torch   the plain-PyTorch path.
  cuda    the CUDA C++ backend (csrc/); not built yet, so it is a clear error.

The variable is read on every call, so a process can switch between calls. The Triton
module is imported on first use: triton reads TRITON_INTERPRET when a kernel is defined.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

ENV_VAR = "BNKERNELS_BACKEND"
CHOICES = ("auto", "triton", "torch", "cuda")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def requested() -> str:
    name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name not in CHOICES:
        raise ValueError(f"{ENV_VAR}={name!r} is not one of {', '.join(CHOICES)}")
    return name


def _triton_module() -> ModuleType:
    return importlib.import_module("bnkernels.triton_batch_norm")


def triton_available() -> bool:
    try:
        _triton_module()
    except ImportError:
        return False
    return True


def _triton_can_run(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())


def select(x: torch.Tensor) -> ModuleType:
    """The module (with forward and backward) that runs a call on x."""
    name = requested()
    if name == "torch":
        return importlib.import_module("bnkernels.reference")
    if name == "cuda":
        raise RuntimeError(
            f"{ENV_VAR}=cuda: the CUDA C++ backend (csrc/) is not part of this build; "
            "use auto, triton or torch")
    if _triton_can_run(x.device) and triton_available():
        return _triton_module()
    if name == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton, but triton cannot be imported")
        raise RuntimeError(
            f"{ENV_VAR}=triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors; "
            f"got a tensor on {x.device}")
    return importlib.import_module("bnkernels.reference")
