"""How the Triton kernels (kernels.py) index a tensor: a program's lanes, its tiles'
offsets and masks, and the regrouping of lane values by channel.

A tensor is read as (N, C, S) through strides (layout.py); a channel's m = N*S values are
its "rows", r = n*S + s. A program takes a block of channels and a share of their rows
(plan.py), one tile at a time: a [BLOCK_C, BLOCK_R] tile of (channel, row) lanes; or, NCHW
with a small S (channel blocks: CHANNEL_SPAN > 0), a [1, BLOCK_R] tile whose lanes run over
a block of channels' contiguous values of one sample, the loop over the samples.
"""
import triton
import triton.language as tl


@triton.jit
def _lanes(C, S, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, CHANNEL_SPAN: tl.constexpr):
    """This program's lanes: (each lane's channel, which lanes hold one, the lane index).

    Rows (CHANNEL_SPAN == 0): a [BLOCK_C, BLOCK_R] tile, a lane per (channel, row) of the
    tile; the channels are a [BLOCK_C, 1] column, the lanes' index a [1, BLOCK_R] row.
    Channel blocks (CHANNEL_SPAN = BLOCK_C * S > 0, NCHW with small S): lanes j over the
    BLOCK_C channels' contiguous S values of one sample, lane j holding channel
    c0 + j // S for every sample (the division once per program, never per element);
    channels and lanes both [1, BLOCK_R]. BLOCK_C divides C: every lane below CHANNEL_SPAN
    holds a channel, so that the lane mask is a constant the compiler can vectorise over."""
    lane = tl.arange(0, BLOCK_R)[None, :]
    if CHANNEL_SPAN > 0:
        channel = tl.program_id(0) * BLOCK_C + lane // S
        holds = lane < CHANNEL_SPAN
    else:
        channel = (tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C))[:, None]
        holds = channel < C
    return channel, holds, lane


@triton.jit
def _tile_offsets(start, lane, channel, S, sN, sC, sS, FLAT_ROWS: tl.constexpr,
                  CHANNEL_SPAN: tl.constexpr, INDEX_64: tl.constexpr):
    """Offsets of the tile at start (_lanes): rows r = start + lane, r = n*S + s, of the
    channels; or (CHANNEL_SPAN) sample n = start of the channel block, whose BLOCK_C * S
    values are contiguous in every tensor of the launch (sC == S, sS == 1: plan.py)."""
    if CHANNEL_SPAN > 0:
        n = start
        block = tl.program_id(0) * CHANNEL_SPAN  # (a constexpr multiple: aligned vectors)
        if INDEX_64:
            n = n.to(tl.int64)
            block = block.to(tl.int64)
        offsets = n * sN + block + lane
    else:
        r = start + lane
        if INDEX_64:
            r = r.to(tl.int64)
            channel = channel.to(tl.int64)
        if FLAT_ROWS:
            row_offsets = r * sS  # sS is the row stride here (layout.kernel_layout)
        else:
            n = r // S
            row_offsets = n * sN + (r - n * S) * sS
        offsets = channel * sC + row_offsets
    return offsets


@triton.jit
def _rows_held(start, lane, row_end, CHANNEL_SPAN: tl.constexpr):
    """[1, BLOCK_R]: which lanes of the tile at start hold a row before row_end (channel
    blocks: a sample, before row_end in the loop's own bound, so every lane)."""
    if CHANNEL_SPAN > 0:
        held = (lane * 0 + start) < row_end
    else:
        held = (start + lane) < row_end
    return held


@triton.jit
def _tile_mask(start, lane, holds, row_end, CHANNEL_SPAN: tl.constexpr):
    """The lanes of the tile at start to load and store: channel blocks, the lanes that hold
    a channel (the loop's bound keeps the samples in range); rows, those with a row too."""
    if CHANNEL_SPAN > 0:
        mask = holds
    else:
        mask = holds & ((start + lane) < row_end)
    return mask


@triton.jit
def _out_channels(C, BLOCK_C: tl.constexpr, SEG_C: tl.constexpr, CHANNEL_SPAN: tl.constexpr):
    """The channels of this program's per-channel results ([BLOCK_C], or channel blocks'
    [SEG_C], SEG_C = BLOCK_C rounded up to a power of two) and which are real."""
    if CHANNEL_SPAN > 0:
        local = tl.arange(0, SEG_C)
        c = tl.program_id(0) * BLOCK_C + local
        real = (local < BLOCK_C) & (c < C)
    else:
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        real = c < C
    return c, real


@triton.jit
def _by_channel(t, S, fill, SEG_C: tl.constexpr, SEG_S: tl.constexpr,
                CHANNEL_SPAN: tl.constexpr):
    """Lane values with one row per channel, to reduce along axis 1 (_pool, tl.sum):
    rows' tiles as they are; channel blocks' [1, BLOCK_R] lanes gathered into
    [SEG_C, SEG_S] (lane c*S + s at (c, s); fill where s >= S or past the block). Once
    per program, after its loop."""
    if CHANNEL_SPAN > 0:
        c = tl.arange(0, SEG_C)[:, None]
        s = tl.arange(0, SEG_S)[None, :]
        j = c * S + s
        real = (s < S) & (j < CHANNEL_SPAN)
        index = tl.reshape(tl.where(real, j, 0), [SEG_C * SEG_S])
        lanes = tl.gather(tl.reshape(t, [t.shape[1]]), index, 0)
        out = tl.where(real, tl.reshape(lanes, [SEG_C, SEG_S]), fill)
    else:
        out = t
    return out


@triton.jit
def _program_rows(R, rows_per_split):
    """This program's rows [row0, row_end) (split program_id(1)): channel blocks' rows are
    samples."""
    row0 = tl.program_id(1) * rows_per_split
    return row0, tl.minimum(row0 + rows_per_split, R)


@triton.jit
def _load_tile(ptr, start, lane, channel, mask, S, sN, sC, sS, FLAT_ROWS: tl.constexpr,
               CHANNEL_SPAN: tl.constexpr, INDEX_64: tl.constexpr, ACC: tl.constexpr):
    offsets = _tile_offsets(start, lane, channel, S, sN, sC, sS, FLAT_ROWS, CHANNEL_SPAN,
                            INDEX_64)
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(ACC)


@triton.jit
def _vectors(t, VEC: tl.constexpr):
    """A [NC, BLOCK_R] tile as [NC, BLOCK_R // VEC, VEC]: each vector is VEC neighbouring
    lanes, one thread's contiguous values where a load is VEC wide (its 128 bits), so that
    a sum over axis 2 stays within the thread (welford.py's states)."""
    return tl.reshape(t, [t.shape[0], t.shape[1] // VEC, VEC])


@triton.jit
def _states_by_channel(a, b, S, VEC: tl.constexpr, SEG_C: tl.constexpr,
                       SEG_P: tl.constexpr, PARTS: tl.constexpr, CHANNEL_SPAN: tl.constexpr):
    """Per-vector states ([NC, G]: welford.py) with one row per channel, to pool along
    axis 1: rows' as they are; channel blocks' [1, G] states A (and B, PARTS == 2: the
    part of a vector in the next channel) gathered into [SEG_C, SEG_P]. Channel c's states
    are those of its vectors r = c*S // VEC + k (k < SEG_P) that start before its end:
    each's A, or B where the vector starts in the channel before; 0 elsewhere. Once per
    program, after its loop, over G * PARTS states (not BLOCK_R lanes)."""
    if CHANNEL_SPAN > 0:
        c = tl.arange(0, SEG_C)[:, None]
        k = tl.arange(0, SEG_P)[None, :]
        first = (c * S) // VEC
        r = first + k
        # (shapes inline: the interpreter turns a shape held in a variable into a tensor)
        real = (r * VEC < (c + 1) * S) & (c * S < CHANNEL_SPAN) & (r < a.shape[1])
        if PARTS == 2:
            index = r * 2 + ((r * VEC) // S != c).to(tl.int32)
            flat = tl.reshape(tl.join(a, b), [2 * a.shape[1]])
        else:
            index = r
            flat = tl.reshape(a, [a.shape[1]])
        picked = tl.gather(flat, tl.reshape(tl.where(real, index, 0), [SEG_C * SEG_P]), 0)
        out = tl.where(real, tl.reshape(picked, [SEG_C, SEG_P]), 0.0)
    else:
        out = a
    return out
