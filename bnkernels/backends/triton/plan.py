"""The Triton backend's launch shape: the tile, the grid, and how the kernels index.

Rows are the flattened (n, s) pairs of a channel: r = n * S + s. When every tensor of a
launch has sN == S * sS (channels_last, 2-D inputs, N == 1 or S == 1) a row is one stride
away from the next and the kernels skip the per-element division r // S ("flat rows").
NCHW with a small S takes channel blocks instead (kernels._lanes): a tile's lanes run over
a block of channels' contiguous S values of one sample, and the loop over the samples.
Why: S = 49 or 196 is no multiple of 8, so rows of one channel start at addresses no
vector load can take, and r // S costs a division per element; a block of 32 x 49 (or
8 x 196) values starts on a multiple of 8 elements, so every access is 128 bits wide.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

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
# The reduce and apply kernels' loops are software-pipelined (tl.range's num_stages: the
# loads of the next stages - 1 iterations go out as cp.async copies into shared memory
# while this one computes), REDUCE_STAGES and APPLY_STAGES deep. Why: a program's loads
# of one iteration are 4-16 KB, and the few programs an SM holds left 16 KB in flight per
# SM, where ~32 KB hide the memory latency at full bandwidth (bench/static_check.py's
# inflight_kb). The apply's iterations load the least (one tile), so it looks furthest
# ahead. float64 inputs are not pipelined (1): their stages would take 128 KB of shared
# memory.
REDUCE_STAGES = 3
APPLY_STAGES = 5
# Programs per SM the grid aims for (target_programs), and the reduce's warps. Why so
# few: each reduce program ends by pooling its Welford states in float64, a fixed cost
# per program as large as several tiles' loop (static_check.py counts it); two
# programs per SM, of 4 warps each, pay it least while the pipelined loops keep 32 KB in
# flight per SM.
PROGRAMS_PER_SM = 2
REDUCE_WARPS = 4


def merge_tile(c: int, splits: int) -> Tuple[int, int, int]:
    """(channels, splits) per step of the merge kernel, and its warps. Splits first: a
    step pools its splits at once, and the steps run one after another, so 528 splits
    take 3 steps, not 528; the channels left over share a program. No more warps than
    give each thread a 128-bit vector of the partials (4 float32)."""
    block_s = min(next_pow2(splits), MERGE_BLOCK_S)
    block_c = min(next_pow2(c), MERGE_BLOCK_C, max(1, MERGE_TILE // block_s))
    return block_c, block_s, max(1, min(4, block_c * block_s // 128))


class KernelLayout(NamedTuple):
    flat_rows: bool
    index_64: bool
    strides: Tuple[Strides, ...]  # per tensor, in the order given; sS is the row stride when flat


def channel_blocks_fit(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every tensor holds each sample's channels as one contiguous run of C * S
    values (sC == S, sS == 1): what channel blocks index by (NCHW, or NCHW's slices)."""
    s = ncs_shape(tensors[0])[2]
    return all(ss == 1 and sc == s for _, sc, ss in (ncs_strides(t) for t in tensors))


def kernel_layout(tensors: Sequence[torch.Tensor], block_c: int, block_r: int,
                  channel_span: int = 0) -> KernelLayout:
    n, c, s = ncs_shape(tensors[0])
    strides = [ncs_strides(t) for t in tensors]
    if channel_span:  # offsets n * sN + (the block's and lane's) < n * sN + C * S + lanes
        reach = max(n * sn + c * s + block_r for sn, _, _ in strides)
        return KernelLayout(False, reach >= 2**31 - 1, tuple(strides))
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
        return PROGRAMS_PER_SM * sm_count(device_index(device))
    return INTERPRETER_PROGRAMS


class LaunchPlan(NamedTuple):
    block_c: int
    block_r: int  # rows per tile; channel blocks: lanes per tile
    c_blocks: int
    splits: int  # programs sharing one channel block, each over rows_per_split rows
    rows_per_split: int  # channel blocks: samples
    num_warps: int
    # Channel blocks (kernels._lanes): block_c * S, the values of a block per sample, and
    # the [seg_c, seg_s] tile its lanes are gathered into by channel; 0 (and 1, 1): rows.
    channel_span: int = 0
    seg_c: int = 1
    seg_s: int = 1
    # The forward reduce's own tile rows (a divisor of block_r, so that a split's rows
    # are whole tiles of both), and the reduce's warps: 0, block_r's and num_warps.
    reduce_block_r: int = 0
    reduce_warps: int = 0

    def reduce_tile(self) -> "Tuple[int, int]":
        """(rows per reduce tile, the reduce's warps)."""
        return self.reduce_block_r or self.block_r, self.reduce_warps or self.num_warps


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


# Channel blocks are for spatial sizes up to this (14 x 14 = 196 fits; 28 x 28 = 784 rows
# are multiples of 8 already, and take row tiles).
CHANNEL_BLOCK_MAX_S = 256


def settings() -> tuple:
    """What a plan depends on beside the shape: this module's tunables, which the tests and
    bench/precision.py's plans change at run time. The launcher's caches of plans and
    replays key on them, so that a changed setting is planned afresh, never served a plan
    made before it."""
    return (GPU_TILE, INTERPRETER_TILE, INTERPRETER_PROGRAMS, MIN_FITTED_ROWS, TAIL_TILE_COST,
            CHANNEL_BLOCK_MAX_S, REDUCE_STAGES, APPLY_STAGES, REDUCE_WARPS, PROGRAMS_PER_SM,
            target_programs)


def _splits(tiles: int, c_blocks: int, device: torch.device,
            most: Optional[int] = None) -> Tuple[int, int]:
    """(splits, tiles per split): as many programs as fill the device (and no more than
    most splits), each over whole groups of GROUP_TILES tiles where it takes at least 3
    tiles, none without tiles."""
    splits = max(1, min(tiles, most or tiles, target_programs(device) // c_blocks))
    tiles_per_split = -(-tiles // splits)
    if tiles_per_split >= GROUP_TILES - 1:  # whole groups (fewer, longer splits)
        tiles_per_split = -(-tiles_per_split // GROUP_TILES) * GROUP_TILES
    return -(-tiles // tiles_per_split), tiles_per_split  # no split is left without rows


def channel_block_plan(n: int, c: int, s: int, device: torch.device) -> Optional[LaunchPlan]:
    """The channel-block plan (kernels._lanes) of an NCHW launch, or None where row tiles
    serve better: S above CHANNEL_BLOCK_MAX_S, or no block of channels (a divisor of C:
    the lane mask stays a constant) that fills a quarter of a tile.

    The block: the most channels that fit a tile, of those that start every block on a
    multiple of 8 values (block * S % 8 == 0: 128-bit vectors of bfloat16); a tile is
    one sample of the block; the samples are split over programs as rows are."""
    tile = GPU_TILE if device.type == "cuda" else INTERPRETER_TILE
    if s > min(CHANNEL_BLOCK_MAX_S, tile):
        return None
    fits = [d for d in range(1, min(c, tile // s) + 1) if c % d == 0]
    aligned = [d for d in fits if d * s % 8 == 0 or d == c]
    block = max(aligned or fits)
    span = block * s
    if span < min(c * s, tile // 4):
        return None
    lanes = next_pow2(span)
    c_blocks = c // block
    # the loop's steps are samples; no more splits than tiles' worth of values: a small
    # tensor stays one split, as its rows would (no merge launch)
    splits, per_split = _splits(n, c_blocks, device, most=-(-n * span // tile))
    warps = 8 if lanes >= 2048 else 4
    return LaunchPlan(block, lanes, c_blocks, splits, per_split, warps, span, next_pow2(block),
                      next_pow2(s), reduce_warps=min(warps, REDUCE_WARPS))


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
    splits, tiles_per_split = _splits(r_tiles, c_blocks, device)
    num_warps = 8 if block_c * block_r >= 2048 else 4
    # channels_last: the forward reduce's tiles half as long (1024 lanes, still 8 values
    # a thread): its states are its lanes there (state_vectors), and a program's end
    # pools them, at a cost that grows with the tile
    reduce_rows = block_r // 2 if channels_fast and block_c * block_r >= 2048 else block_r
    return LaunchPlan(block_c, block_r, c_blocks, splits, tiles_per_split * block_r, num_warps,
                      reduce_block_r=reduce_rows, reduce_warps=min(num_warps, REDUCE_WARPS))


def state_vectors(plan: LaunchPlan, element_size: int, s: int, channels_fast: bool,
                  row_stride: int, flat_rows: bool) -> Tuple[int, int, int]:
    """(VEC, PARTS, SEG_P) of the forward reduction's Welford states (welford.py): a state
    per VEC neighbouring lanes of a channel, VEC a 128-bit vector of the element type
    where a thread's loads are that wide (rows of stride 1: NCHW, channel blocks), 1
    (a state per lane) where they are not (channels_last's vectors hold neighbouring
    channels; strided rows; NCHW rows whose samples' S values are no multiple of it, where
    a vector would straddle two samples). Channel blocks: a divisor of S where one of 4
    or more values divides it (14 x 14: 4), so that no vector straddles two channels;
    otherwise (7 x 7) no wider than S, so that a vector spans two channels at most, with
    two parts per vector (PARTS). SEG_P: the most states of one channel, rounded up to a
    power of two, that tiles._states_by_channel gathers."""
    vec = 16 // element_size if not channels_fast and row_stride == 1 else 1
    vec = min(vec, plan.reduce_tile()[0])
    if not plan.channel_span:
        while not flat_rows and s % vec:
            vec //= 2
        return vec, 1, 1
    dividing = vec
    while s % dividing:
        dividing //= 2
    if dividing >= 4 or dividing == vec:  # vectors that never straddle two channels
        return dividing, 1, next_pow2(s // dividing)
    while vec > s:
        vec //= 2
    if vec == 1:
        return 1, 1, next_pow2(s)
    return vec, 2, next_pow2(-(-s // vec) + 1)
