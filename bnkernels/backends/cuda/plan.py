"""The CUDA C++ backend's launch shape: threads per block, channels per block, splits."""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ...layout import device_index, next_pow2, sm_count

# The CUDA C++ backend (csrc/): threads per block on a GPU, and in the CPU emulation (its
# fibers are cheaper few), blocks per SM to aim for, and rows each row lane takes at least.
CUDA_BLOCK_THREADS = 256
EMULATED_BLOCK_THREADS = 64
EMULATED_BLOCKS = 4  # blocks the emulation should aim for (it runs them one after another)
CUDA_BLOCKS_PER_SM = 8
CUDA_MIN_ROWS_PER_LANE = 4


class BlockPlan(NamedTuple):
    threads: int
    block_c: int  # channels per block; threads // block_c row lanes
    splits: int
    rows_per_split: int


def block_plan(n: int, c: int, s: int, channels_fast: bool, device: torch.device) -> BlockPlan:
    """Block shape and grid for csrc/'s kernels (the counterpart of the Triton backend's launch_plan).

    channels_fast: up to 32 channels side by side (a warp reads 32 neighbours). NCHW: all
    threads on the rows of one channel, unless it has fewer rows than threads. A channel
    block's rows are then split over as many blocks as fill the device.
    """
    if device.type == "cuda":
        threads, target = CUDA_BLOCK_THREADS, CUDA_BLOCKS_PER_SM * sm_count(device_index(device))
    else:
        threads, target = EMULATED_BLOCK_THREADS, EMULATED_BLOCKS
    return _block_plan(n * s, c, channels_fast, threads, target, CUDA_MIN_ROWS_PER_LANE)


# Cached: it runs on every call of the backend whose point is a small host cost.
@functools.lru_cache(maxsize=4096)
def _block_plan(rows: int, c: int, channels_fast: bool, threads: int, target: int,
                min_rows_per_lane: int) -> BlockPlan:
    if channels_fast:
        block_c = min(next_pow2(c), 32, threads)
    else:
        block_c = min(next_pow2(c), max(1, threads // min(next_pow2(rows), threads)))
    lanes = threads // block_c
    c_blocks = -(-c // block_c)
    splits = max(1, min(-(-rows // (lanes * min_rows_per_lane)), target // c_blocks))
    rows_per_split = -(-rows // splits)
    return BlockPlan(threads, block_c, -(-rows // rows_per_split), rows_per_split)
