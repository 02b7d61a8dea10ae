"""The forward statistics' arithmetic (docs/math.md): a program's Welford states over its
share of the rows, and how partials are pooled and merged (kernels.py's reduce and merge).

A state is one vector of a tile's lanes (tiles._vectors: VEC neighbouring values of one
channel, one thread's 128-bit load), or, in a channel block whose channel ends inside the
vector, each of its two parts (A, and B for the next channel). It keeps its running mean
as K + mean (re-centred by TwoSum), its variance as var + err, its count n and the plain
sum of its values. Why a state per vector, not per lane: each step then takes the 4 * VEC
values of a group of tiles in one Chan combine, whose group mean and variance are sums
within the thread (a few instructions a value, where a lane's update cost ~15), and a
program ends with BLOCK_R / VEC states to pool, not BLOCK_R lanes (the pooling was a
program's largest fixed cost: bench/static_check.py). channels_last keeps VEC = 1, a state
per lane: its vectors hold neighbouring channels.
"""
import triton
import triton.language as tl

from .plan import GROUP_TILES
from .tiles import _load_tile, _rows_held, _tile_mask, _vectors

# Tiles per group step of the states (the forward loop's groups).
_GROUP = tl.constexpr(GROUP_TILES)


@triton.jit
def _welford_combine(k_a, mean_a, var_a, n_a, sum_a, k_b, mean_b, var_b, n_b, sum_b):
    """Chan, Golub & LeVeque, on partials (K, mean, var, n, sum) whose mean is that of
    x - K and var the biased variance (var, not M2 = n * var: for |x| near 1e19, M2
    overflows float32 where var does not). The result keeps a's shift:
        d = (K_b - K_a) + (mean_b - mean_a),  w_b = n_b / n
        mean = mean_a + d * w_b,  var = w_a * var_a + w_b * var_b + (d * w_a) * (d * w_b)
    An empty partial (n == 0: masked lanes) is skipped by selection, never multiplied by
    its zero weight (inf * 0 would be NaN)."""
    n = n_a + n_b
    w_b = n_b / tl.where(n == 0, 1.0, n)
    w_a = 1.0 - w_b
    d = (k_b - k_a) + (mean_b - mean_a)
    # The merged mean relative to K_a or to K_b: keep the smaller, so that a shift that
    # is an outlier (one lane's first value) does not become every later merge's shift.
    mean_ka = mean_a + d * w_b
    mean_kb = mean_b - d * w_a
    take_kb = tl.abs(mean_kb) < tl.abs(mean_ka)
    mean = tl.where(take_kb, mean_kb, mean_ka)
    var = w_a * var_a + w_b * var_b + (d * w_a) * (d * w_b)
    a_empty = n_a == 0
    b_empty = n_b == 0
    k = tl.where(a_empty | (take_kb & ~b_empty), k_b, k_a)
    mean = tl.where(a_empty, mean_b, tl.where(b_empty, mean_a, mean))
    var = tl.where(a_empty, var_b, tl.where(b_empty, var_a, var))
    return k, mean, var, n, sum_a + sum_b


@triton.jit
def _pool(k, mean, var, n, count):
    """Partials ([BLOCK_C, P]: the lanes of a program, or a step of the merge's splits;
    n may be [1, P]) pooled into one per channel ([BLOCK_C] mean, var), in float64:
        mu_i = K_i + mean_i,  w_i = n_i / count,  count = sum n_i (given: the caller
        knows it without a reduction)
        mean = sum w_i mu_i,  var = sum w_i (var_i + (mu_i - mean)^2)
    the pooled variance exactly (the mean's own error enters it squared), weighted so
    that no sum outgrows the data (n_i mu_i would overflow for float64 data near 1e300).
    An empty partial (n_i = 0: a masked lane, a step's padding) is left out by
    selection, never multiplied by its zero weight (inf * 0 would be NaN). Why not
    Chan's pairwise combine (_welford_combine): a tree of log2(P) rounds, each a float64
    division per pair, made the merge of 392 splits the longest serial chain of a
    training forward and every program's end its largest fixed cost
    (bench/static_check.py); this is two sums and one reciprocal per channel."""
    held = n > 0
    mu = k + mean
    w = n * (1.0 / tl.where(count > 0, count, 1.0))[:, None]
    pooled = tl.sum(tl.where(held, w * mu, 0.0), axis=1)
    dev = mu - pooled[:, None]
    return pooled, tl.sum(tl.where(held, w * (var + dev * dev), 0.0), axis=1)


@triton.jit
def _two_sum(a, b):
    """(a + b rounded, the exact rounding error of that sum): Knuth's TwoSum (no product,
    so no FMA contraction can change it). The statistics loop keeps the running mean
    K + mean, and the variance with its error, to twice the working precision with it."""
    s = a + b
    b_part = s - a
    err = (a - (s - b_part)) + (b - b_part)
    return s, err


@triton.jit
def _finish_stats(k, mean, var, total, n):
    """The channel's (mean, var) from a merged partial: K + mean, or, where that is not
    finite (an inf or NaN in x: Welford's running mean turns inf into NaN), the plain
    mean sum / n, which carries torch's inf (one sign) or NaN (both)."""
    shifted = k + mean
    finite = tl.abs(shifted) < float("inf")
    return tl.where(finite, shifted, total / n), var


@triton.jit
def _parts(holds, S, NC: tl.constexpr, G: tl.constexpr, VEC: tl.constexpr,
           PARTS: tl.constexpr, CHANNEL_SPAN: tl.constexpr, ACC: tl.constexpr):
    """The lanes each vector's states take, and how many: (in_a, in_b) [NC, G, VEC] and
    (size_a, size_b) [NC, G]. Rows: state A takes every lane of a vector whose channel is
    held (in_* are not needed). Channel blocks: the vector's lanes before the block's end;
    with PARTS == 2 (VEC <= S: a vector spans two channels at most) state A takes those up
    to where its first lane's channel ends and state B the next channel's after it.
    Worked out per vector (one division each, none per lane), from positions alone, so
    that they take the layout of the values they mask."""
    position = tl.arange(0, VEC)[None, None, :]
    if CHANNEL_SPAN > 0:
        starts = (tl.arange(0, G) * VEC)[None, :]
        held = tl.minimum(tl.maximum(CHANNEL_SPAN - starts, 0), VEC)
        size_a = held
        if PARTS == 2:
            size_a = tl.minimum(held, (starts // S + 1) * S - starts)
        in_a = position < size_a[:, :, None]
        in_b = (position >= size_a[:, :, None]) & (position < held[:, :, None])
        size_b = (held - size_a).to(ACC)
        size_a = size_a.to(ACC)
    else:
        size_a = tl.broadcast_to(tl.where(holds, VEC, 0).to(ACC), [NC, G])
        size_b = size_a
        in_a = position >= 0
        in_b = in_a
    return in_a, in_b, size_a, size_b


@triton.jit
def _first_values(x, size_a, VEC: tl.constexpr, PARTS: tl.constexpr):
    """Each state's first value in the tile x ([NC, G, VEC]): the origin K it starts from,
    so that its first group's x - K is exact too (Sterbenz; from K = 0, the group mean of
    1e4 + randn would round at 1e4's scale, and that error would reach the variance
    through every later step). A state without values starts from whatever it got."""
    position = tl.arange(0, VEC)[None, None, :]
    k_a = tl.sum(tl.where(position == 0, x, 0.0), axis=2)
    if PARTS == 2:  # B's first lane is where A's end
        k_b = tl.sum(tl.where(position == size_a.to(tl.int32)[:, :, None], x, 0.0), axis=2)
    else:
        k_b = k_a
    return k_a, k_b


@triton.jit
def _group_sums(v0, v1, v2, v3, in_a, in_b, PARTS: tl.constexpr):
    """The sums over each state's lanes of a group's 4 tiles ([NC, G, VEC] each), of
    states A and B: with PARTS == 1, over every lane (a vector's lanes all hold a channel
    or none does, and a state of none is never pooled)."""
    both = (v0 + v1) + (v2 + v3)
    if PARTS == 2:
        sum_a = tl.sum(tl.where(in_a, both, 0.0), axis=2)
        sum_b = tl.sum(tl.where(in_b, both, 0.0), axis=2)
    else:
        sum_a = tl.sum(both, axis=2)
        sum_b = sum_a
    return sum_a, sum_b


@triton.jit
def _group_moments(v0, v1, v2, v3, in_a, in_b, inv_a, inv_b, SCALE: tl.constexpr,
                   PARTS: tl.constexpr):
    """The mean m and variance q of each state's values v = x - K in a group of 4 tiles
    ([NC, G, VEC] each; inv_*: 1 / the state's values in the group), for states A and B,
    exactly from them, the squares scaled by a power of two so that no partial sum
    overflows before q itself would (|x| up to ~1.8e19):
        m = sum v * inv,  q = sum ((v - m) * SCALE)^2 * inv / SCALE^2
    """
    sum_a, sum_b = _group_sums(v0, v1, v2, v3, in_a, in_b, PARTS)
    m_a = sum_a * inv_a
    m_b = sum_b * inv_b
    m = (m_a * SCALE)[:, :, None]
    if PARTS == 2:
        m = tl.where(in_b, (m_b * SCALE)[:, :, None], m)
    # (v - m) * SCALE as one FMA: v * SCALE and m * SCALE are exact (a power of two)
    h0, h1, h2, h3 = v0 * SCALE - m, v1 * SCALE - m, v2 * SCALE - m, v3 * SCALE - m
    q_a, q_b = _group_sums(h0 * h0, h1 * h1, h2 * h2, h3 * h3, in_a, in_b, PARTS)
    unscale = 1.0 / (SCALE * SCALE)
    return m_a, q_a * (inv_a * unscale), m_b, q_b * (inv_b * unscale)


@triton.jit
def _tile_moments(v, member, inv, SCALE: tl.constexpr):
    """_group_moments of one tile's lanes in member (the share's last tiles, after its
    whole groups: some lanes may have no row)."""
    m = tl.sum(tl.where(member, v, 0.0), axis=2) * inv
    h = v * SCALE - (m * SCALE)[:, :, None]
    return m, tl.sum(tl.where(member, h * h, 0.0), axis=2) * (inv * (1.0 / (SCALE * SCALE)))


@triton.jit
def _state_step(k, mean, var, err, m, q, w, took):
    """A state after a step that took values of mean m and variance q (of x - K) that are
    a share w of its values after the step; unchanged where it took none (took false):
    Chan's combine, the mean as K + mean, the variance summed with its rounding error,
        d = m - mean;  mean += d * w
        var += (w * q + (d * w) * (m - mean) - var * w), summed with its error
        (where that sum is not finite, an overflow or a NaN: var = var * (1 - w) + t,
        err = 0, in which inf stays inf and NaN stays NaN)
        (K, mean) = (K + mean, its rounding error)
    Its terms are bounded by a squared half-range, as a one-value update's are
    ((d * w) * (m - mean) <= d^2 / 4): no overflow before the data's own."""
    d = m - mean
    dw = d * w
    stepped = mean + dw
    t = w * q + dw * (m - stepped)
    var_sum, e = _two_sum(var, (t - var * w) + err)
    summed = tl.abs(var_sum) < float("inf")
    new_var = tl.where(summed, var_sum, var * (1.0 - w) + t)
    new_err = tl.where(summed, e, 0.0)
    new_k, new_mean = _two_sum(k, stepped)
    return (tl.where(took, new_k, k), tl.where(took, new_mean, mean),
            tl.where(took, new_var, var), tl.where(took, new_err, err))


@triton.jit
def _forward_states(x_ptr, row0, row_end, lane, channel, holds, S, sN, sC, sS,
                    NC: tl.constexpr, FLAT_ROWS: tl.constexpr, CHANNEL_SPAN: tl.constexpr,
                    INDEX_64: tl.constexpr, ROW_STEP: tl.constexpr, VEC: tl.constexpr,
                    PARTS: tl.constexpr, STAGES: tl.constexpr, ACC: tl.constexpr):
    """The program's states over its rows [row0, row_end), one pass over x: whole groups
    of _GROUP tiles first (every lane active, no row mask; one step per group, w = 4/steps
    for every state), then the tail, a tile at a time (a state's share w = took / n: one
    reciprocal per state and tile). Returns (K, mean, var, err, n, sum) of the states A
    and of the states B ([NC, G] each; B's are A's where PARTS == 1)."""
    # 1 / a power of two >= sqrt(the values of a group step): _group_moments' scale
    group_scale = 0.125 if VEC >= 8 else (0.25 if VEC >= 2 else 0.5)
    G: tl.constexpr = lane.shape[1] // VEC
    in_a, in_b, size_a, size_b = _parts(holds, S, NC, G, VEC, PARTS, CHANNEL_SPAN, ACC)
    inv_a = 1.0 / (_GROUP * tl.maximum(size_a, 1.0))  # (once per state)
    inv_b = 1.0 / (_GROUP * tl.maximum(size_b, 1.0))
    lanes = tl.broadcast_to(holds, [NC, lane.shape[1]])
    first = _load_tile(x_ptr, row0, lane, channel, lanes & _rows_held(row0, lane, row_end,
                       CHANNEL_SPAN), S, sN, sC, sS, FLAT_ROWS, CHANNEL_SPAN, INDEX_64, ACC)
    k_a, k_b = _first_values(_vectors(first, VEC), size_a, VEC, PARTS)
    mean_a = tl.zeros_like(k_a)
    var_a, err_a, n_a, total_a = mean_a, mean_a, mean_a, mean_a
    mean_b, var_b, err_b, n_b, total_b = mean_a, mean_a, mean_a, mean_a, mean_a
    steps = tl.zeros([1, 1], ACC)

    group_rows = _GROUP * ROW_STEP
    group_end = row0 + (row_end - row0) // group_rows * group_rows
    for start in tl.range(row0, group_end, group_rows, num_stages=STAGES):
        x0 = _vectors(_load_tile(x_ptr, start, lane, channel, lanes, S, sN, sC, sS,
                                 FLAT_ROWS, CHANNEL_SPAN, INDEX_64, ACC), VEC)
        x1 = _vectors(_load_tile(x_ptr, start + ROW_STEP, lane, channel, lanes, S, sN, sC,
                                 sS, FLAT_ROWS, CHANNEL_SPAN, INDEX_64, ACC), VEC)
        x2 = _vectors(_load_tile(x_ptr, start + 2 * ROW_STEP, lane, channel, lanes, S, sN,
                                 sC, sS, FLAT_ROWS, CHANNEL_SPAN, INDEX_64, ACC), VEC)
        x3 = _vectors(_load_tile(x_ptr, start + 3 * ROW_STEP, lane, channel, lanes, S, sN,
                                 sC, sS, FLAT_ROWS, CHANNEL_SPAN, INDEX_64, ACC), VEC)
        steps += _GROUP
        w = _GROUP / steps  # every state's share: each took _GROUP tiles of its lanes
        origin = k_a[:, :, None]
        if PARTS == 2:
            origin = tl.where(in_b, k_b[:, :, None], origin)
        m_a, q_a, m_b, q_b = _group_moments(x0 - origin, x1 - origin, x2 - origin,
                                            x3 - origin, in_a, in_b, inv_a, inv_b,
                                            group_scale, PARTS)
        k_a, mean_a, var_a, err_a = _state_step(k_a, mean_a, var_a, err_a, m_a, q_a, w,
                                                size_a > 0)
        n_a += _GROUP * size_a
        sum_a, sum_b = _group_sums(x0, x1, x2, x3, in_a, in_b, PARTS)
        total_a += sum_a
        if PARTS == 2:
            k_b, mean_b, var_b, err_b = _state_step(k_b, mean_b, var_b, err_b, m_b, q_b, w,
                                                    size_b > 0)
            n_b += _GROUP * size_b
            total_b += sum_b
    position = tl.arange(0, VEC)[None, None, :]
    starts = (tl.arange(0, G) * VEC)[None, :]
    for start in tl.range(group_end, row_end, ROW_STEP):
        mask = tl.broadcast_to(_tile_mask(start, lane, holds, row_end, CHANNEL_SPAN),
                               [NC, lane.shape[1]])
        x = _vectors(_load_tile(x_ptr, start, lane, channel, mask, S, sN, sC, sS, FLAT_ROWS,
                                CHANNEL_SPAN, INDEX_64, ACC), VEC)
        origin = k_a[:, :, None]
        if PARTS == 2:
            origin = tl.where(in_b, k_b[:, :, None], origin)
        if CHANNEL_SPAN > 0:  # every lane of the block has this sample
            member = in_a
            took = size_a
        else:  # the vector's lanes up to the share's last row (rows only run out)
            took = tl.where(holds, tl.minimum(tl.maximum(row_end - start - starts, 0), VEC),
                            0).to(ACC)
            member = position < took.to(tl.int32)[:, :, None]
        v = x - origin
        m, q = _tile_moments(v, member, 1.0 / tl.maximum(took, 1.0), 0.5 / VEC)
        n_a += took
        k_a, mean_a, var_a, err_a = _state_step(k_a, mean_a, var_a, err_a, m, q,
                                                took / tl.maximum(n_a, 1.0), took > 0)
        total_a += tl.sum(tl.where(member, x, 0.0), axis=2)
        if PARTS == 2:
            m, q = _tile_moments(v, in_b, 1.0 / tl.maximum(size_b, 1.0), 0.5 / VEC)
            n_b += size_b
            k_b, mean_b, var_b, err_b = _state_step(k_b, mean_b, var_b, err_b, m, q,
                                                    size_b / tl.maximum(n_b, 1.0), size_b > 0)
            total_b += tl.sum(tl.where(in_b, x, 0.0), axis=2)
    return k_a, mean_a, var_a, err_a, n_a, total_a, k_b, mean_b, var_b, err_b, n_b, total_b
