"""The Triton backend's launch shape: the tile, the grid, and how the kernels index.

Rows are the flattened (n, s) pairs of a channel: r = n * S + s. When every tensor of a
launch has sN == S * sS (channels_last, 2-D inputs, N == 1 or S == 1) a row is one stride
away from the next and the kernels skip the per-element division r // S ("flat rows").
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple

import torch

from ...layout import Strides, device_index, ncs_shape, ncs_strides, next_pow2, sm_count

# Elements per program tile. The interpreter runs a tile as one numpy operation, so it
# wants big tiles; the GPU wants tiles that fit the registers of one program.
GPU_TILE = 2048
INTERPRETER_TILE = 16384
# Programs the interpreter should aim for (it runs them one after another).
INTERPRETER_PROGRAMS = 4
# The merge kernel's tile: splits x channels per step, at most MERGE_TILE elements (five
# float64 partials each, in registers), at most MERGE_BLOCK_S splits and MERGE_BLOCK_C
# channels. 256 splits a step: 392 splits (channels_last, 64 x 56 x 56 at N = 32) take 2
# serial steps (with 64: 7, which left the merge the pass's largest cost in the static
# check's model).
MERGE_TILE = 1024
# The forward reduction's loop takes its rows GROUP_TILES tiles at a time (kernels.py's
# _group_update), so a split holds a multiple of them where it holds at least 3 tiles.
GROUP_TILES = 4
MERGE_BLOCK_S = 256
MERGE_BLOCK_C = 256


def merge_tile(c: int, splits: int) -> Tuple[int, int]:
    """(channels, splits) per step of the merge kernel. Splits first: a step merges its
    splits as a tree (log2 rounds), and the steps run one after another, so 528 splits
    take 3 steps, not 528; the channels left over share a program."""
    block_s = min(next_pow2(splits), MERGE_BLOCK_S)
    block_c = min(next_pow2(c), MERGE_BLOCK_C, max(1, MERGE_TILE // block_s))
    return block_c, block_s


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


def target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * sm_count(device_index(device))
    return INTERPRETER_PROGRAMS


class LaunchPlan(NamedTuple):
    block_c: int
    block_r: int
    c_blocks: int
    splits: int  # programs sharing one channel block, each over rows_per_split rows
    rows_per_split: int
    num_warps: int


# NCHW tiles: rows per tile no shorter than this when fitted to the rows (_fitted_rows).
MIN_FITTED_ROWS = 128
# What a tile the forward reduction takes alone (past its split's last whole group of
# GROUP_TILES) costs against a grouped one: ~40 SASS instructions per value against ~17
# (bench/results/static).
TAIL_TILE_COST = 2.3


def _fitted_rows(rows: int, block_r: int) -> int:
    """block_r, or a half, quarter, ... of it (no shorter than MIN_FITTED_ROWS) where that
    costs less: the padded rows of the last tile, and the tiles past the last whole group
    of GROUP_TILES, which the forward reduction takes one at a time (TAIL_TILE_COST). Why:
    128 x 7 x 7 = 6272 rows in 2048-row tiles is four tiles, 8192 rows, 77% of the lanes
    active; 32 x 7 x 7 = 1568 rows in 256-row tiles is 7 tiles, 3 of them alone; in
    128-row tiles, 13: 94% active, 3 groups and 1 alone."""
    def cost(b):
        tiles = -(-rows // b)
        return b * (tiles // GROUP_TILES * GROUP_TILES + TAIL_TILE_COST * (tiles % GROUP_TILES))
    best = block_r
    candidate = block_r // 2
    while candidate >= MIN_FITTED_ROWS:
        if cost(candidate) < cost(best):
            best = candidate
        candidate //= 2
    return best


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
        block_c = min(next_pow2(c), 64)
        block_r = min(next_pow2(rows), max(1, tile // block_c))
    else:
        block_r = _fitted_rows(rows, min(next_pow2(rows), tile))
        block_c = min(next_pow2(c), max(1, tile // block_r))
    c_blocks = -(-c // block_c)
    r_tiles = max(1, -(-rows // block_r))
    splits = max(1, min(r_tiles, target_programs(device) // c_blocks))
    tiles_per_split = -(-r_tiles // splits)
    if tiles_per_split >= GROUP_TILES - 1:  # whole groups (fewer, longer splits)
        tiles_per_split = -(-tiles_per_split // GROUP_TILES) * GROUP_TILES
    splits = -(-r_tiles // tiles_per_split)  # no split is left without rows
    num_warps = 8 if block_c * block_r >= 2048 else 4
    return LaunchPlan(block_c, block_r, c_blocks, splits, tiles_per_split * block_r, num_warps)
