"""The `cuda` backend: csrc/'s CUDA C++ kernels. build.py compiles them (nvcc for a GPU,
the host compiler for the CPU emulation), library.py loads the result through ctypes and
checks its ABI, plan.py shapes a launch, launch.py turns a call record into one BnkCall.
Nothing here runs at `import bnkernels`: the library is found on the first call that
selects this backend."""
from __future__ import annotations

from ..contract import LauncherBackend
from . import launch, library

BACKEND = LauncherBackend("cuda", launch.forward, launch.backward, library.launch_counts)
