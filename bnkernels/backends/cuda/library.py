"""libbnkernels_cuda through ctypes: the BnkCall mirror of csrc/bnk_api.h, and which build
a device gets.

  CUDA tensors   setup.py's build (build.PREBUILT, sm_80 + sm_90 + PTX) when it was made
                 from the sources beside it, else the cached build for the device's arch,
                 compiled with nvcc on first use (once per machine and source version).
  CPU tensors    the emulation build (BNKERNELS_CUDA_EMULATE=1; tests only).

Nothing here runs at `import bnkernels`: the library is found on the first call that
selects the cuda backend, and a failure is a RuntimeError that says why.
"""
from __future__ import annotations

import ctypes
import os
from typing import Dict, Optional

import torch

from ... import activations
from . import build as cuda_build

EMULATE_ENV = "BNKERNELS_CUDA_EMULATE"
PASSES = ("reduce", "merge", "apply", "fused")  # bnk_launch_counts' order


class BnkTensor(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("sn", ctypes.c_int64), ("sc", ctypes.c_int64),
                ("ss", ctypes.c_int64)]


class BnkCall(ctypes.Structure):
    """csrc/bnk_api.h's BnkCall, field for field (checked against the library on load)."""
    _fields_ = [
        ("n", ctypes.c_int64), ("c", ctypes.c_int64), ("s", ctypes.c_int64),
        ("x", BnkTensor), ("g", BnkTensor), ("res", BnkTensor), ("y", BnkTensor),
        ("out", BnkTensor), ("dres", BnkTensor),
        ("weight", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("mean", ctypes.c_void_p),
        ("rstd_or_var", ctypes.c_void_p), ("sum_g", ctypes.c_void_p),
        ("sum_gx", ctypes.c_void_p), ("channel_count", ctypes.c_void_p),
        ("stats_out", ctypes.c_void_p * 3), ("workspace", ctypes.c_void_p),
        ("eps", ctypes.c_double), ("count", ctypes.c_double),
        ("dtype", ctypes.c_int32), ("weight_dtype", ctypes.c_int32),
        ("bias_dtype", ctypes.c_int32), ("stat_dtype", ctypes.c_int32),
        ("activation", ctypes.c_int32), ("training", ctypes.c_int32),
        ("given_var", ctypes.c_int32), ("layout", ctypes.c_int32),
        ("threads", ctypes.c_int32), ("block_c", ctypes.c_int32), ("splits", ctypes.c_int32),
        ("device", ctypes.c_int32), ("rows_per_split", ctypes.c_int64),
        ("stream", ctypes.c_void_p),
        ("running_mean", ctypes.c_void_p), ("running_var", ctypes.c_void_p),
        ("num_batches_tracked", ctypes.c_void_p), ("running_sm", ctypes.c_int64),
        ("running_sv", ctypes.c_int64), ("momentum", ctypes.c_double),
        ("running_dtype", ctypes.c_int32), ("cumulative", ctypes.c_int32),
        ("grad_out", ctypes.c_void_p * 2), ("grad_dtype", ctypes.c_int32 * 2),
        ("vec", ctypes.c_int32),
    ]


DTYPE_CODES: Dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2,
                                       torch.float64: 3}


def emulation_enabled() -> bool:
    return os.environ.get(EMULATE_ENV, "0") not in ("", "0")


def _check_abi(lib: ctypes.CDLL) -> None:
    """The library's BnkCall layout and activation codes are this module's."""
    offsets = (ctypes.c_int64 * 64)()
    count = lib.bnk_call_offsets(offsets, 64)
    ours = [ctypes.sizeof(BnkCall)] + [getattr(BnkCall, name).offset for name, _ in
                                       BnkCall._fields_]
    if list(offsets[:count]) != ours:
        raise RuntimeError("libbnkernels_cuda's BnkCall differs from library.BnkCall "
                           f"(sizeof and offsets {list(offsets[:count])} vs {ours})")
    for name in activations.ACTIVATIONS:
        theirs = lib.bnk_activation_name(activations.code(name))
        if (theirs or b"").decode() != (name or "identity"):
            raise RuntimeError(f"libbnkernels_cuda's activation code {activations.code(name)} "
                               f"is {theirs!r}, bnkernels' is {name or 'identity'!r}")


_LOADED: Dict[str, ctypes.CDLL] = {}


def _load(path: str) -> ctypes.CDLL:
    if path in _LOADED:
        return _LOADED[path]
    lib = ctypes.CDLL(path)
    for name in ("bnk_forward", "bnk_backward"):
        getattr(lib, name).argtypes = [ctypes.POINTER(BnkCall)]
        getattr(lib, name).restype = ctypes.c_int
    lib.bnk_error_string.argtypes = [ctypes.c_int]
    lib.bnk_error_string.restype = ctypes.c_char_p
    lib.bnk_call_offsets.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int]
    lib.bnk_call_offsets.restype = ctypes.c_int
    lib.bnk_activation_name.argtypes = [ctypes.c_int]
    lib.bnk_activation_name.restype = ctypes.c_char_p
    lib.bnk_launch_counts.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    lib.bnk_launch_counts.restype = None
    _check_abi(lib)
    _LOADED[path] = lib
    return lib


def _kind(device: torch.device) -> str:
    if device.type == "cpu":
        return "emulate"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


def _prebuilt_covers(kind: str) -> bool:
    """setup.py's build runs on sm_80 and newer (sm_80 SASS on 8.x, PTX beyond 9.0)."""
    return kind != "emulate" and int(kind) >= 80 and cuda_build.prebuilt_is_current()


def library_path(device: torch.device, build: bool = True) -> Optional[str]:
    """The library for device's kind; with build=False, None where it would need a compile.
    Raises cuda_build.BuildError where it can't be had."""
    explicit = os.environ.get("BNKERNELS_CUDA_LIB")
    if explicit:
        return explicit
    kind = _kind(device)
    if _prebuilt_covers(kind):
        return str(cuda_build.PREBUILT)
    if cuda_build.source_digest() is None:
        if build:
            raise cuda_build.BuildError("no library was built for this GPU, and the csrc/ "
                                        "sources are not installed to build one")
        return None
    path = cuda_build.cached_path(kind)
    if path.exists() or not build:
        return str(path) if path.exists() else None
    return str(cuda_build.build_cached(kind))


# Per device, looked up once per process (a call must not hash sources or stat files).
_BY_DEVICE: Dict[torch.device, ctypes.CDLL] = {}
_BUILT: Dict[torch.device, bool] = {}


def library(device: torch.device) -> ctypes.CDLL:
    """The loaded library for device, built first if needed (RuntimeError if it can't be)."""
    lib = _BY_DEVICE.get(device)
    if lib is not None:
        return lib
    why = "BNKERNELS_BACKEND=cuda: the CUDA C++ backend is not available: "
    try:
        path = library_path(device)
    except cuda_build.BuildError as error:
        raise RuntimeError(why + str(error)) from None
    try:
        lib = _BY_DEVICE[device] = _load(path)
    except OSError as error:
        raise RuntimeError(f"{why}{path} does not load: {error}") from None
    _BUILT[device] = True
    return lib


def is_built(device: torch.device) -> bool:
    """Whether device's library exists already (auto never starts a compile). Looked up
    once per process, unless a cuda-backend call builds it meanwhile."""
    built = _BUILT.get(device)
    if built is None:
        built = _BUILT[device] = library_path(device, build=False) is not None
    return built


def launch_counts() -> Dict[str, int]:
    """Kernel launches so far by pass, summed over every library this process loaded."""
    totals = dict.fromkeys(PASSES, 0)
    for lib in list(_LOADED.values()):
        counts = (ctypes.c_int64 * len(PASSES))()
        lib.bnk_launch_counts(counts)
        for name, value in zip(PASSES, counts):
            totals[name] += value
    return totals
