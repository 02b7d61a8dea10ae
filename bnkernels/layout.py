"""How a BatchNorm tensor is laid out for the kernels, and how a launch is shaped.

Every input (N, C, *spatial) is read as an (N, C, S) view through three strides
(sN, sC, sS), so NCHW, channels_last and many strided views need no copy. Only a view
whose spatial dims do not collapse into one stride (a transposed H/W, say) is copied.

Rows are the flattened (n, s) pairs of a channel: r = n * S + s. When every tensor of a
launch has sN == S * sS (channels_last, 2-D inputs, N == 1 or S == 1) a row is one stride
away from the next and the kernels skip the per-element division r // S ("flat rows").
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

# Elements per program tile. The interpreter runs a tile as one numpy operation, so it
# wants big tiles; the GPU wants tiles that fit the registers of one program.
GPU_TILE = 2048
INTERPRETER_TILE = 16384
# Programs the interpreter should aim for (it runs them one after another).
INTERPRETER_PROGRAMS = 4
# Channels per program of the per-channel merge kernel.
MERGE_BLOCK_C = 256

Strides = Tuple[int, int, int]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics accumulate in float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ncs_shape(x: torch.Tensor) -> Tuple[int, int, int]:
    n, c = x.shape[0], x.shape[1]
    s = 1
    for size in x.shape[2:]:
        s *= size
    return n, c, s


def ncs_strides(t: torch.Tensor) -> Optional[Strides]:
    """(sN, sC, sS) of t read as (N, C, S), or None when its spatial dims don't collapse."""
    # The two common layouts first: this runs several times per call, on the host.
    if t.is_contiguous():
        return t.stride(0), t.stride(1), 1
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.stride(0), t.stride(1), t.shape[1] if t.shape[2] * t.shape[3] > 1 else 1
    return strided_ncs_strides(t)


def strided_ncs_strides(t: torch.Tensor) -> Optional[Strides]:
    """ncs_strides for any strided view: the spatial dims of size > 1, innermost first, must
    each be the previous one's stride times its size."""
    inner = None  # stride of the innermost spatial dim of size > 1
    expected = None  # the stride the next spatial dim out must have to collapse
    for size, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if size == 1:
            continue
        if inner is None:
            inner = stride
        elif stride != expected:
            return None
        expected = stride * size
    if inner is None:
        inner = 1
    return t.stride(0), t.stride(1), inner


def alloc_output(x: torch.Tensor) -> torch.Tensor:
    """The output (and input gradient) of a call on x, with torch's strides: channels_last
    (channels_last_3d) where x is in that format, contiguous otherwise, whatever x's own
    strides (a transposed or N/C-swapped view gives a contiguous result, so y.view(-1)
    works wherever it works on torch's). The fake (meta) implementations call this too, so
    compiled and eager strides agree."""
    out = torch.empty_like(x)  # x's strides if x is dense, else torch's suggested format
    if out.is_contiguous() or any(out.dim() == d and out.is_contiguous(memory_format=f)
                                  for d, f in _CHANNELS_LAST):
        return out
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_CHANNELS_LAST = ((4, torch.channels_last), (5, torch.channels_last_3d))


def kernel_ready(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t itself if the kernels can read it through strides, else a contiguous copy (None
    for an optional tensor the call doesn't have)."""
    if t is None:
        return None
    return t if ncs_strides(t) is not None else t.contiguous()


class KernelLayout(NamedTuple):
    flat_rows: bool
    index_64: bool
    strides: Tuple[Strides, ...]  # per tensor, in the order given; sS is the row stride when flat


def kernel_layout(tensors: Sequence[torch.Tensor], block_c: int, block_r: int) -> KernelLayout:
    n, c, s = ncs_shape(tensors[0])
    strides = [ncs_strides(t) for t in tensors]
    flat = all(n == 1 or s == 1 or sn == s * ss for sn, _, ss in strides)
    if flat:
        # a row is one stride away from the next: sN when S == 1, sS otherwise
        strides = [(sn, sc, sn if s == 1 else ss) for sn, sc, ss in strides]
    # A bound on every offset a lane forms, masked lanes of the last tiles included
    # (rows up to n*s + block_r); past int32, the kernels index in int64.
    if flat:
        reach = max((n * s + block_r) * ss + (c + block_c) * sc for _, sc, ss in strides)
    else:
        reach = max((n + block_r // s + 1) * sn + s * ss + (c + block_c) * sc
                    for sn, sc, ss in strides)
    return KernelLayout(flat, max(reach, n * s + block_r) >= 2**31 - 1, tuple(strides))


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * _sm_count(_index(device))
    return INTERPRETER_PROGRAMS


class LaunchPlan(NamedTuple):
    block_c: int
    block_r: int
    c_blocks: int
    splits: int  # programs sharing one channel block, each over rows_per_split rows
    rows_per_split: int
    num_warps: int


def launch_plan(n: int, c: int, s: int, channels_fast: bool, device: torch.device) -> LaunchPlan:
    """Tile shape and grid for the reduction and elementwise kernels.

    channels_fast (channels_last): the tile is wide along C, the contiguous axis.
    Otherwise (NCHW): the tile is long along rows and holds few channels.
    A channel's rows are then split over as many programs as fill the device, so that
    64 channels at 112x112 and 2048 channels at 7x7 both use every SM.
    """
    rows = n * s
    tile = GPU_TILE if device.type == "cuda" else INTERPRETER_TILE
    if channels_fast:
        block_c = min(_next_pow2(c), 64)
        block_r = min(_next_pow2(rows), max(1, tile // block_c))
    else:
        block_r = min(_next_pow2(rows), tile)
        block_c = min(_next_pow2(c), max(1, tile // block_r))
    c_blocks = -(-c // block_c)
    r_tiles = max(1, -(-rows // block_r))
    splits = max(1, min(r_tiles, target_programs(device) // c_blocks))
    tiles_per_split = -(-r_tiles // splits)
    splits = -(-r_tiles // tiles_per_split)  # no split is left without rows
    num_warps = 8 if block_c * block_r >= 2048 else 4
    return LaunchPlan(block_c, block_r, c_blocks, splits, tiles_per_split * block_r, num_warps)


# The CUDA C++ backend (csrc/): threads per block on a GPU, and in the CPU emulation (its
# fibers are cheaper few), blocks per SM to aim for, and rows each row lane takes at least.
CUDA_BLOCK_THREADS = 256
EMULATED_BLOCK_THREADS = 64
CUDA_BLOCKS_PER_SM = 8
CUDA_MIN_ROWS_PER_LANE = 4


class BlockPlan(NamedTuple):
    threads: int
    block_c: int  # channels per block; threads // block_c row lanes
    splits: int
    rows_per_split: int


def block_plan(n: int, c: int, s: int, channels_fast: bool, device: torch.device) -> BlockPlan:
    """Block shape and grid for csrc/'s kernels (the counterpart of launch_plan).

    channels_fast: up to 32 channels side by side (a warp reads 32 neighbours). NCHW: all
    threads on the rows of one channel, unless it has fewer rows than threads. A channel
    block's rows are then split over as many blocks as fill the device.
    """
    if device.type == "cuda":
        threads, target = CUDA_BLOCK_THREADS, CUDA_BLOCKS_PER_SM * _sm_count(_index(device))
    else:
        threads, target = EMULATED_BLOCK_THREADS, INTERPRETER_PROGRAMS
    return _block_plan(n * s, c, channels_fast, threads, target, CUDA_MIN_ROWS_PER_LANE)


# Cached: it runs on every call of the backend whose point is a small host cost.
@functools.lru_cache(maxsize=4096)
def _block_plan(rows: int, c: int, channels_fast: bool, threads: int, target: int,
                min_rows_per_lane: int) -> BlockPlan:
    if channels_fast:
        block_c = min(_next_pow2(c), 32, threads)
    else:
        block_c = min(_next_pow2(c), max(1, threads // min(_next_pow2(rows), threads)))
    lanes = threads // block_c
    c_blocks = -(-c // block_c)
    splits = max(1, min(-(-rows // (lanes * min_rows_per_lane)), target // c_blocks))
    rows_per_split = -(-rows // splits)
    return BlockPlan(threads, block_c, -(-rows // rows_per_split), rows_per_split)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()
