"""The `triton` backend: kernels.py (the kernels), plan.py (their launch shape), launch.py
(a call record as launches). CUDA tensors run the compiled kernels; CPU tensors run them
under TRITON_INTERPRET=1 (the interpreter), which is how the CPU test suite runs them."""
from __future__ import annotations

from ..contract import LauncherBackend
from . import launch

BACKEND = LauncherBackend("triton", launch.forward, launch.backward,
                          lambda: dict(launch.launch_counts),
                          (launch.forward_replayer, launch.backward_replayer))
