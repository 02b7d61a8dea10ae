"""The backends, and which one runs a call: BNKERNELS_BACKEND = auto | triton | cuda | torch.

Every backend implements contract.Backend (forward and backward of one call record);
ops.py prepares the records and calls select(x)'s backend. The packages:
  triton/       the Triton kernels (kernels.py), their launch plan and launchers
  cuda/         the CUDA C++ kernels of csrc/: build, ctypes library, launch plan, launcher
  reference.py  plain PyTorch (the `torch` backend, and the tests' float64 reference)

  triton  the Triton kernels, or a clear error where they cannot run. CPU tensors run
          them under TRITON_INTERPRET=1 (the interpreter).
  cuda    the CUDA C++ kernels of csrc/, or a clear error where they cannot run (no GPU,
          no library and no nvcc to build one). CPU tensors run them under
          BNKERNELS_CUDA_EMULATE=1 (an emulation build, for the tests).
  torch   plain PyTorch (reference.py).
  auto    per call, on CUDA tensors: cuda for the launch-bound size class (at most
          AUTO_CUDA_MAX_NUMEL elements), where the C++ launcher's few microseconds of host
          time beat Triton's Python launcher, if its library is built already (auto never
          starts a compile); triton otherwise. On CPU tensors: triton under the
          interpreter, else torch.

AUTO_CUDA_MAX_NUMEL is provisional: no GPU has timed the two backends side by side yet.
bench/bench_launch.py (host time per call) and bench/bench_bn.py (device time, both
providers) are the measurements that set it.

The variable is read on every call, so a process can switch between calls; what it
selects is cached per (variable values, device type), so a call costs a dictionary lookup,
not a new decision. The Triton package is imported on first use: triton reads
TRITON_INTERPRET when a kernel is defined.
"""
from __future__ import annotations

import importlib
import os

import torch

from .contract import Backend

ENV_VAR = "BNKERNELS_BACKEND"
CHOICES = ("auto", "triton", "cuda", "torch")
# auto's size class boundary (elements of x): see the module docstring.
AUTO_CUDA_MAX_NUMEL = 1 << 20


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def requested() -> str:
    name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name not in CHOICES:
        raise ValueError(f"{ENV_VAR}={name!r} is not one of {', '.join(CHOICES)}")
    return name


_MODULES = {"triton": "triton", "cuda": "cuda", "torch": "reference"}
_BACKENDS: dict = {}


def get(name: str) -> Backend:
    """The backend called name (triton, cuda or torch), imported on first use."""
    backend = _BACKENDS.get(name)
    if backend is None:
        backend = importlib.import_module(f"{__name__}.{_MODULES[name]}").BACKEND
        _BACKENDS[name] = backend
    return backend


def triton_available() -> bool:
    try:
        get("triton")
    except ImportError:
        return False
    return True


def _triton_can_run(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())


def _cuda_can_run(device: torch.device) -> bool:
    from .cuda.library import emulation_enabled
    return device.type == "cuda" or (device.type == "cpu" and emulation_enabled())


def auto_prefers_cuda(x: torch.Tensor) -> bool:
    """auto's rule, given both backends can run x: the launch-bound size class."""
    return x.numel() <= AUTO_CUDA_MAX_NUMEL


def _select_cuda(x: torch.Tensor) -> Backend:
    if not _cuda_can_run(x.device):
        raise RuntimeError(
            f"{ENV_VAR}=cuda needs CUDA tensors, or BNKERNELS_CUDA_EMULATE=1 for CPU tensors; "
            f"got a tensor on {x.device}")
    from .cuda.library import library
    library(x.device)  # built and loaded now, or a RuntimeError that says why not
    return get("cuda")


# select()'s decisions that depend on no more than the environment and the device type.
_SELECTED: dict = {}
_ENVIRONMENT = (ENV_VAR, "TRITON_INTERPRET", "BNKERNELS_CUDA_EMULATE")


def _environment_reader():
    """The values of _ENVIRONMENT's variables, as a key. Why not os.environ.get: it encodes
    the name and decodes the value on every call (about 1 us each); os.environ's own store,
    where it has one (_data, keyed by encoded names), is read as it is."""
    data, encode = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    if not isinstance(data, dict) or encode is None:
        return lambda: tuple(os.environ.get(v) for v in _ENVIRONMENT)
    backend, interpret, emulate = (encode(v) for v in _ENVIRONMENT)
    get = data.get
    return lambda: (get(backend), get(interpret), get(emulate))


_environment = _environment_reader()


def environment() -> tuple:
    """The values of the variables select() reads (its answer for a device type and size
    class is a function of them, except auto's on small CUDA tensors: cached_choice)."""
    return _environment()


def cached_choice(x: torch.Tensor) -> bool:
    """Whether select(x)'s answer is kept for x's device type, size class and environment()
    (not auto on a small CUDA tensor, which a library built later changes)."""
    return select(x) is _SELECTED.get(_selection_key(x))


def _selection_key(x: torch.Tensor) -> tuple:
    device_type = x.device.type
    # auto on CUDA tensors also weighs x's size class, and, for the small one, whether a
    # library is built yet (a later build changes the answer: that one is not kept)
    size_class = device_type == "cuda" and x.numel() <= AUTO_CUDA_MAX_NUMEL
    # (the interpreter's and the emulation's variables only matter for CPU tensors, but
    # reading them is cheaper than telling)
    return device_type, size_class, _environment()


def select(x: torch.Tensor) -> Backend:
    """The backend that runs a call on x."""
    key = _selection_key(x)
    backend = _SELECTED.get(key)
    if backend is None:
        backend = _select(x)
        if not (key[1] and requested() == "auto"):
            _SELECTED[key] = backend
    return backend


def _select(x: torch.Tensor) -> Backend:
    name = requested()
    if name == "torch":
        return get("torch")
    if name == "cuda":
        return _select_cuda(x)
    if name == "auto" and x.device.type == "cuda" and auto_prefers_cuda(x):
        from .cuda.library import is_built
        if is_built(x.device):
            return get("cuda")
    if _triton_can_run(x.device) and triton_available():
        return get("triton")
    if name == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton, but triton cannot be imported")
        raise RuntimeError(
            f"{ENV_VAR}=triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors; "
            f"got a tensor on {x.device}")
    return get("torch")
