"""The CUDA C++ backend's launch shape: threads per block, channels per block, splits."""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from ...layout import device_index, next_pow2, sm_count

# The CUDA C++ backend (csrc/): threads per block on a GPU, and in the CPU emulation (its
# fibers are cheaper few), blocks per SM to aim for, and rows each row lane takes at least.
CUDA_BLOCK_THREADS = 256
EMULATED_BLOCK_THREADS = 64
EMULATED_BLOCKS = 4  # blocks the emulation should aim for (it runs them one after another)
# (few: each block ends with folds whose cost grows with its threads' states; its loops
# take 4 vectors at once, so two blocks keep enough loads in flight)
CUDA_BLOCKS_PER_SM = 2
CUDA_MIN_ROWS_PER_LANE = 4


# BnkCall.layout's codes (csrc/bnk_api.h)
ROWS, CHANNELS, BLOCKS = 0, 1, 2


class BlockPlan(NamedTuple):
    threads: int
    block_c: int  # channels per block: threads // block_c row lanes (channels_last:
    #               block_c // vec channel lanes, threads // that row lanes)
    splits: int
    rows_per_split: int  # (channel blocks: samples)
    vec: int = 1  # elements per vector (csrc/bnk_api.h)
    layout: int = ROWS


def block_plan(n: int, c: int, s: int, channels_fast: bool, device: torch.device,
               vec: int = 1) -> BlockPlan:
    """Block shape and grid for csrc/'s kernels (the counterpart of the Triton backend's
    launch_plan).

    channels_fast: up to 32 channel vectors side by side (a warp reads 32 neighbours).
    NCHW: all threads on the rows of one channel, unless it has fewer row vectors than
    threads. A channel block's rows are then split over as many blocks as fill the device,
    each split a whole number of vectors. vec: the elements a thread takes at once along
    the contiguous axis (the launcher's vector_width).
    """
    if device.type == "cuda":
        threads, target = CUDA_BLOCK_THREADS, CUDA_BLOCKS_PER_SM * sm_count(device_index(device))
    else:
        threads, target = EMULATED_BLOCK_THREADS, EMULATED_BLOCKS
    return _block_plan(n * s, c, channels_fast, threads, target, CUDA_MIN_ROWS_PER_LANE, vec)


def channel_block_plan(n: int, c: int, s: int, device: torch.device,
                       vec: int) -> Optional[BlockPlan]:
    """The BNK_BLOCKS plan of NCHW whose S takes no whole vectors (7 x 7, 14 x 14), or
    None where no block serves: block_c, the most channels whose S values (a span of the
    block's contiguous values in each sample) fit a vector per thread and start every
    block on a vector's boundary (block_c * S a multiple of vec); the samples split over
    as many blocks as fill the device, CUDA_MIN_ROWS_PER_LANE samples a split at least."""
    if device.type == "cuda":
        threads, target = CUDA_BLOCK_THREADS, CUDA_BLOCKS_PER_SM * sm_count(device_index(device))
    else:
        threads, target = EMULATED_BLOCK_THREADS, EMULATED_BLOCKS
    if s < vec:
        return None
    fits = [d for d in range(1, min(c, threads * vec // s) + 1)
            if c % d == 0 and d * s % vec == 0]
    if not fits:
        return None
    block_c = max(fits)
    splits = max(1, min(-(-n // CUDA_MIN_ROWS_PER_LANE), target // (c // block_c)))
    per_split = -(-n // splits)
    return BlockPlan(threads, block_c, -(-n // per_split), per_split, vec, BLOCKS)


# Cached: it runs on every call of the backend whose point is a small host cost.
@functools.lru_cache(maxsize=4096)
def _block_plan(rows: int, c: int, channels_fast: bool, threads: int, target: int,
                min_rows_per_lane: int, vec: int = 1) -> BlockPlan:
    if channels_fast:  # a lane's step is a row; its vector, vec channels
        channel_lanes = min(next_pow2(-(-c // vec)), 32, threads)
        block_c, units, unit = channel_lanes * vec, rows, 1
    else:  # a lane's step is a vector of vec rows
        units, unit = -(-rows // vec), vec
        channel_lanes = block_c = min(next_pow2(c), max(1, threads // min(next_pow2(units),
                                                                         threads)))
    lanes = threads // channel_lanes
    c_blocks = -(-c // block_c)
    splits = max(1, min(-(-units // (lanes * min_rows_per_lane)), target // c_blocks))
    per_split = -(-units // splits) * unit
    return BlockPlan(threads, block_c, -(-rows // per_split), per_split, vec,
                     CHANNELS if channels_fast else ROWS)
