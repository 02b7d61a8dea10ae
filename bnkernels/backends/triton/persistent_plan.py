"""Where the persistent training pass (persistent.py) may run, and what it needs: the rule,
the residency check that keeps its grid barrier from waiting forever, its merge tile,
and the barrier's state.

The rule (allowed, then resident): a training forward or a backward through the batch
statistics whose plan splits a channel over programs (one split needs no merge: the
three-kernel path is two launches there), and on a GPU
  - BNKERNELS_PERSISTENT (read at import; MODE here): "auto" (the default) applies the
    size rule below, "on" skips it, "off" never takes the path;
  - size: the bytes the pass reads twice (x forward, x and g backward) no more than
    L2_FRACTION of the L2 cache, so that the second read after the barrier comes from
    L2 (an H100's 50 MB: tensors up to 25 MB). Larger tensors take the three kernels;
  - co-residency: the current stream is the device's default stream (a side stream may
    share the GPU with another persistent launch, or be capturing a CUDA graph whose
    replay runs beside other work), no MPS daemon (MPS can cap a client's SMs), and the
    grid no larger than the programs the GPU holds at once, from the compiled kernel's
    registers, shared memory and warps (resident_programs).
On CPU tensors (the interpreter) only MODE "on" takes it, as three launches (PHASES).

Why the residency check rarely refuses: the grid is the three-kernel plan's, at most
plan.PROGRAMS_PER_SM (2) programs per SM, and the kernel runs at the reduce's 4 warps, so
two programs need 256 threads and at most 2 x 4 x 32 x 255 registers (65,280 of 65,536)
per SM; only shared memory could refuse: the pipelined loops take up to 96 KB a program
(float32), which two programs get from an H100's 228 KB per SM
(bench/results/static/summary_persistent_sm90.md: no ResNet-50 grid refused) but not from
an A100's 164 KB. A refused grid falls back to the three kernels; it is not re-planned.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Optional, Tuple

import torch

from ...caches import keep
from ...layout import device_index, next_pow2
from .plan import MERGE_BLOCK_S, MERGE_TILE

MODE_ENV = "BNKERNELS_PERSISTENT"
MODE = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
# The share of L2 the bytes read twice may take (the rest: y, the partials, other data).
L2_FRACTION = 0.5
# How many times a program reads the barrier's generation before it gives up (about a
# second on an H100, where one read is ~0.5 us): only ever reached when a program of the
# launch could not become resident.
SPIN_LIMIT = 1 << 21
# The interpreter runs the kernel's phases as separate launches (persistent.py: PHASE);
# the tests set this False to run PHASE 0, and its barrier, through the interpreter.
INTERPRETER_PHASES = True
# Whether launches on CPU tensors compile the trap a GPU launch has (persistent.py's TRAP):
# bench/static_check_persistent.py records CPU calls and compiles them as a GPU would.
TRAP_ON_CPU = False


def settings() -> tuple:
    """What the choice depends on beside the shape (the launcher's cache keys take it)."""
    return MODE, L2_FRACTION, SPIN_LIMIT, INTERPRETER_PHASES, TRAP_ON_CPU


@functools.lru_cache(maxsize=None)
def _mps() -> bool:
    """Whether an MPS daemon serves this process (read once)."""
    return bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY")) or os.path.exists("/tmp/nvidia-mps")


def on_default_stream(device: torch.device) -> bool:
    """Whether the current stream of the CUDA device is its default stream."""
    index = device_index(device)
    get = getattr(torch._C, "_cuda_getCurrentStream", None)
    if get is not None:
        return get(index)[0] == 0  # (stream id, device, type): id 0 is the default stream
    return torch.cuda.current_stream(index) == torch.cuda.default_stream(index)


def context_key(device: torch.device):
    """What the choice reads of the moment, beside the tensors: a replay of a call keys
    on it (a call recorded on the default stream is not replayed on a side stream)."""
    return device.type == "cuda" and on_default_stream(device)


def allowed(device: torch.device, splits: int, twice_bytes: int) -> bool:
    """The rule's first part (module docstring): all but the residency check."""
    if splits < 2 or MODE == "off":
        return False
    if device.type != "cuda":
        return MODE == "on"
    if _mps() or not on_default_stream(device):
        return False
    if MODE == "on":
        return True
    l2 = getattr(torch.cuda.get_device_properties(device_index(device)), "L2_cache_size", 0)
    return twice_bytes <= L2_FRACTION * l2


def merge_tile(c: int, programs: int, splits: int) -> Tuple[int, int]:
    """(MERGE_C, MERGE_S): channels a program merges (every channel taken by one program),
    and splits a step (no more than the merge kernel's tile of partials)."""
    merge_c = next_pow2(-(-c // programs))
    merge_s = min(next_pow2(splits), MERGE_BLOCK_S, max(1, MERGE_TILE // merge_c))
    return merge_c, merge_s


_RESIDENT: dict = {}
_WARNED: list = []


def resident_programs(kernel, device: torch.device, args: tuple, meta: dict,
                      key: tuple) -> int:
    """How many programs of the kernel, compiled for these arguments, the GPU holds at
    once: SMs x the fewest of (threads, registers, shared memory, 32) per SM allow.
    Compiles it (triton's warmup: no launch) the first time a key is seen; 0 where the
    compiled kernel does not say its registers (never assumed resident)."""
    found = _RESIDENT.get(key)
    if found is not None:
        return found
    try:
        compiled = kernel.warmup(*args, grid=(1,), **meta)
        init = getattr(compiled, "_init_handles", None)
        if init is not None:
            init()
    except Exception as error:  # a triton without warmup, say: the three kernels, said once
        if not _WARNED:
            _WARNED.append(error)
            warnings.warn(f"bnkernels: the persistent pass's occupancy could not be read "
                          f"({error!r}); training passes take the three kernels")
        return keep(_RESIDENT, 4096, key, 0)
    regs = getattr(compiled, "n_regs", None)
    shared = getattr(getattr(compiled, "metadata", None), "shared", None)
    warps = meta.get("num_warps", 4)
    if not regs or shared is None:
        return keep(_RESIDENT, 4096, key, 0)
    props = torch.cuda.get_device_properties(device_index(device))
    threads = getattr(props, "max_threads_per_multi_processor", 2048)
    regs_per_sm = getattr(props, "regs_per_multiprocessor", 65536)
    smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    regs_per_warp = -(-regs * 32 // 256) * 256  # allocated per warp, 256 at a time
    per_sm = min(threads // (32 * warps), regs_per_sm // regs_per_warp // warps,
                 smem // (shared + 1024), 32)  # 1 KB of shared memory per block: the system's
    return keep(_RESIDENT, 4096, key, max(0, per_sm) * props.multi_processor_count)


_STATES: dict = {}


def barrier_state(device: torch.device) -> torch.Tensor:
    """The device's barrier state (persistent.py): [arrivals, generation, error, unused],
    int32, zero when made; every launch that completes leaves it with no arrivals. One a
    device: the persistent path runs on the default stream only, one launch at a time."""
    key = (device.type, device.index if device.type != "cuda" else device_index(device))
    state = _STATES.get(key)
    if state is None:
        state = _STATES[key] = torch.zeros(4, dtype=torch.int32, device=device)
    return state


def failed(state: torch.Tensor) -> Optional[str]:
    """On CPU (read without a synchronisation): the error a barrier left, resetting the
    state for the next launch; None where there is none."""
    if state.device.type == "cuda" or int(state[2]) == 0:
        return None
    state.zero_()
    return ("bnkernels: the persistent BatchNorm kernel's grid barrier timed out (a program "
            "of the launch was not resident); its outputs are invalid and the running "
            f"statistics were not updated. Set {MODE_ENV}=off to use the three-kernel path.")
