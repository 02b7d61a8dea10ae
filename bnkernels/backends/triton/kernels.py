"""The Triton backend's kernels: the three passes of docs/math.md (launch.py launches them).

A tensor is read as (N, C, S) through strides (layout.py); a channel's m = N*S values are
its "rows". One kernel per pass, each serving forward and backward (BACKWARD switch):

  _reduce_kernel  grid (channel blocks, splits). Each program reduces its share of the rows
                  of a block of channels: Welford (K, mean, var, sum) forward,
                  (sum g, sum g*xhat) backward.
  _merge_kernel   grid (channel blocks,). Merges the splits in a fixed order, so the
                  result is bitwise reproducible (no atomics).
  _apply_kernel   grid (channel blocks, splits). The elementwise pass: normalize + affine
                  (+ epilogue) forward, the input gradient backward.

Training forward = reduce + merge + apply (x is read twice, y written once); eval forward
= apply; backward = reduce + merge + apply with batch statistics, apply alone for the input
gradient through constant statistics. NCHW and channels_last differ only in a constexpr
switch (FLAT_ROWS) and the tile shape the launch plan picks.

Fused epilogue (ACTIVATION, HAS_RESIDUAL): forward stores act(z), z = bn(x) + residual,
from the apply kernel; backward turns dL/dy into dL/dz where it reads it, in both the
reduce and the apply kernel (_epilogue_grad), and the apply kernel also writes dL/dz as
the residual's gradient (HAS_DRES). No pass is added.

The per-channel statistics a pass normalizes with are a mean and, through one pointer,
either an rstd or (FROM_VAR) a variance, rstd = 1/sqrt(var + eps): backends/contract.py's
Normalizer.
"""
import triton
import triton.language as tl

from ...activations import GELU, IDENTITY, RELU, SILU
from .plan import GROUP_TILES

# The activation codes, as the constexprs a kernel may read.
_IDENTITY = tl.constexpr(IDENTITY)
_RELU = tl.constexpr(RELU)
_SILU = tl.constexpr(SILU)
_GELU = tl.constexpr(GELU)
# Tiles per Welford group update (_group_update takes 4 values per lane).
_GROUP = tl.constexpr(GROUP_TILES)


# ----------------------------------------------------------------------------- kernels


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
    """Lane values with one row per channel, to reduce along axis 1 (_merge_lanes, tl.sum):
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
def _inv_std(var, eps, ACC: tl.constexpr):
    """1 / sqrt(var + eps), correctly rounded (tl.sqrt is the fast approximate one in fp32;
    sqrt_rn takes fp32 only)."""
    if ACC == tl.float64:
        inv = 1.0 / tl.sqrt(var + eps)
    else:
        inv = 1.0 / tl.sqrt_rn(var + eps)
    return inv


@triton.jit
def _channel_stats(mean_ptr, rstd_or_var_ptr, c, c_mask, eps, smC, ssC,
                   FROM_VAR: tl.constexpr, ACC: tl.constexpr):
    """Per-channel (mean, rstd): rstd as given, or (FROM_VAR) 1/sqrt(var + eps) from the
    variance given. Every per-channel vector is read through its stride (smC, ssC here): a
    strided or expanded view (stride 0) is read in place, never copied."""
    mean = tl.load(mean_ptr + c * smC, mask=c_mask, other=0.0).to(ACC)
    rstd = tl.load(rstd_or_var_ptr + c * ssC, mask=c_mask, other=1.0).to(ACC)
    if FROM_VAR:
        rstd = _inv_std(rstd, eps, ACC)
    return mean, rstd


@triton.jit
def _affine(weight_ptr, bias_ptr, rstd, c, c_mask, swC, sbC,
            HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """Per-channel (scale, shift) = (gamma * rstd, beta) of y = (x - mean) * scale + shift."""
    if HAS_WEIGHT:
        scale = tl.load(weight_ptr + c * swC, mask=c_mask, other=0.0).to(ACC) * rstd
    else:
        scale = rstd
    if HAS_BIAS:
        shift = tl.load(bias_ptr + c * sbC, mask=c_mask, other=0.0).to(ACC)
    else:
        shift = tl.zeros_like(rstd)
    return scale, shift


@triton.jit
def _z_mean_shift(mean, scale, shift):
    """The (mean, shift) that z = (x - mean) * scale + shift uses. Where gamma * rstd is
    inf or NaN, torch's own form x * scale + (beta - mean * scale) instead (mean 0, shift
    beta - mean * scale), so that the output has torch's pattern of NaN and inf; (x - mean)
    first everywhere else, since for |mean| >> std x * scale + b would cancel."""
    finite = tl.abs(scale) < float("inf")
    return tl.where(finite, mean, 0.0), tl.where(finite, shift, shift - mean * scale)


@triton.jit
def _pre_activation(x, mean, scale, shift, res_ptr, res_offsets, mask,
                    HAS_RESIDUAL: tl.constexpr, ACC: tl.constexpr):
    """z = (x - mean) * scale + shift (+ residual): the forward's expression, which the
    backward repeats term for term so that its z (and relu's z > 0) is the forward's.
    (x - mean) is formed before scaling: for |mean| >> std, x*a + b would cancel."""
    z = (x - mean) * scale + shift
    if HAS_RESIDUAL:
        z += tl.load(res_ptr + res_offsets, mask=mask, other=0.0).to(ACC)
    return z


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    """act(z) for the codes of activations.py (gelu: the erf form)."""
    if ACTIVATION == _RELU:
        y = tl.where(z < 0, 0.0, z)  # not tl.maximum: NaN must stay NaN, as in torch.relu
    elif ACTIVATION == _SILU:
        y = z * tl.sigmoid(z)
    elif ACTIVATION == _GELU:
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    else:
        y = z
    return y


@triton.jit
def _activation_grad(g, z, ACTIVATION: tl.constexpr):
    """dL/dz = g * act'(z), g = dL/dy (relu: torch's rule, g where z > 0)."""
    if ACTIVATION == _RELU:
        d = tl.where(z > 0, g, 0.0)
    elif ACTIVATION == _SILU:
        s = tl.sigmoid(z)
        d = g * (s * (1.0 + z * (1.0 - s)))
    elif ACTIVATION == _GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327  # 1/sqrt(2*pi)
        d = g * (cdf + z * pdf)
    else:
        d = g
    return d


@triton.jit
def _epilogue_grad(g, x, mean, scale, shift, res_ptr, res_offsets, y_ptr, y_offsets, mask,
                   ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                   MASK_FROM_Y: tl.constexpr, ACC: tl.constexpr):
    """dL/dz from g = dL/dy, through the activation of z = bn(x) (+ residual).

    z is recomputed from x (and the residual); except for relu after a residual add
    (MASK_FROM_Y), whose mask z > 0 is y > 0, read from the saved output y: torch's relu
    keeps y as well, so the fused op keeps no more than the unfused ops, where keeping the
    residual would (a downsample branch's output is otherwise freed after the add)."""
    if MASK_FROM_Y:
        y = tl.load(y_ptr + y_offsets, mask=mask, other=0.0)
        d = tl.where(y > 0, g, 0.0)
    else:
        z = _pre_activation(x, mean, scale, shift, res_ptr, res_offsets, mask, HAS_RESIDUAL, ACC)
        d = _activation_grad(g, z, ACTIVATION)
    return d


@triton.jit
def _program_rows(R, rows_per_split):
    """This program's rows [row0, row_end) (split program_id(1)): channel blocks' rows are
    samples."""
    row0 = tl.program_id(1) * rows_per_split
    return row0, tl.minimum(row0 + rows_per_split, R)


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
def _pairs(t):
    """A [C, 2m] tile as its even and odd columns, two [C, m] tiles."""
    return tl.split(tl.reshape(t, [t.shape[0], t.shape[1] // 2, 2]))


@triton.jit
def _merge_lanes(k, mean, var, n, total):
    """The lanes' partials (each [BLOCK_C, BLOCK_R]) merged into one per channel ([BLOCK_C]
    K, mean, var, sum) by _welford_combine, pairwise: lane 2i with lane 2i+1, then again,
    log2(BLOCK_R) rounds. Why not tl.reduce with _welford_combine: the same tree on
    a GPU, but triton's interpreter runs a custom combine once per element in Python, which
    made a 65k-element channel take a minute there; these rounds are whole-tile operations."""
    tl.static_assert(k.shape[1] <= 65536)
    for _ in tl.static_range(16):
        if k.shape[1] > 1:  # shapes are compile-time constants: this unrolls
            k_a, k_b = _pairs(k)
            mean_a, mean_b = _pairs(mean)
            var_a, var_b = _pairs(var)
            n_a, n_b = _pairs(n)
            sum_a, sum_b = _pairs(total)
            k, mean, var, n, total = _welford_combine(k_a, mean_a, var_a, n_a, sum_a,
                                                      k_b, mean_b, var_b, n_b, sum_b)
    # (shapes inline: the interpreter turns a shape held in a variable into a tensor)
    return (tl.reshape(k, [k.shape[0]]), tl.reshape(mean, [k.shape[0]]),
            tl.reshape(var, [k.shape[0]]), tl.reshape(total, [k.shape[0]]))


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
def _lerp(a, b, w):
    """torch.lerp's formula (a + w * (b - a), or from b's side for |w| >= 0.5), so that the
    running statistics are those torch's update would give."""
    return tl.where(tl.abs(w) < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def _store_batch_stats(c, c_mask, k, mean, var, total, n, eps, R,
                       mean_ptr, rstd_ptr, var_ptr, rm_ptr, rv_ptr, nbt_ptr,
                       momentum_hi, momentum_lo, srmC, srvC,
                       UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr,
                       ACC: tl.constexpr):
    """A channel's merged (float64) partial as its statistics: mean (_finish_stats), rstd =
    1/sqrt(var + eps) and the biased var, in ACC; and (UPDATE_RUNNING) the running
    statistics updated in place, in the launch that made the statistics:
        running = lerp(running, batch, f),  batch var unbiased: var * R / (R - 1)
        f = momentum (given as hi + lo, two float32s: a float64 momentum survives), or
            (CUMULATIVE) 1 / (num_batches_tracked + 1): the counter as the module's step
            leaves it; the apply kernel, launched after this one, stores the + 1.
    Buffers of any float dtype: blended in ACC, rounded once. No host synchronisation."""
    mean, var = _finish_stats(k, mean, var, total, n)
    mean, var = mean.to(ACC), var.to(ACC)
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(rstd_ptr + c, _inv_std(var, eps, ACC), mask=c_mask)
    tl.store(var_ptr + c, var, mask=c_mask)
    if UPDATE_RUNNING:
        if CUMULATIVE:
            factor = 1.0 / (tl.load(nbt_ptr).to(ACC) + 1.0)
        else:
            factor = tl.cast(momentum_hi, ACC) + tl.cast(momentum_lo, ACC)
        count = tl.cast(R, ACC)
        unbiased = var * (count / (count - 1.0))
        rm = tl.load(rm_ptr + c * srmC, mask=c_mask, other=0.0)
        rv = tl.load(rv_ptr + c * srvC, mask=c_mask, other=0.0)
        tl.store(rm_ptr + c * srmC, _lerp(rm.to(ACC), mean, factor).to(rm.dtype), mask=c_mask)
        tl.store(rv_ptr + c * srvC, _lerp(rv.to(ACC), unbiased, factor).to(rv.dtype),
                 mask=c_mask)


@triton.jit
def _load_tile(ptr, start, lane, channel, mask, S, sN, sC, sS, FLAT_ROWS: tl.constexpr,
               CHANNEL_SPAN: tl.constexpr, INDEX_64: tl.constexpr, ACC: tl.constexpr):
    offsets = _tile_offsets(start, lane, channel, S, sN, sC, sS, FLAT_ROWS, CHANNEL_SPAN,
                            INDEX_64)
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(ACC)


@triton.jit
def _group_update(x0, x1, x2, x3, k, mean, var, var_err, w):
    """One lane's Welford state (K + mean, var + var_err over n values) after 4 more
    values, w = 4 / (n + 4): Chan's combine with the group's own mean and variance, taken
    exactly from its 4 values (shifted by K, as the one-value update shifts),
        v_i = x_i - K;  m = mean(v);  q = mean((v_i - m)^2) = sum(((v_i - m) / 2)^2)
        d = m - mean;  mean += d * w
        var += (w * q + (d * w) * (m - mean) - var * w), summed with its error
        (K, mean) = (K + mean, its rounding error)
    Why: the one-value update costs ~35 instructions per value, which left the bfloat16
    forward reduction issue-bound (bench/static_check.py); this is ~14. Its terms are
    bounded as the one-value update's are (q and (d*w)*(m - mean) by a squared half-range),
    and a non-finite sum takes the same plain update."""
    v0, v1, v2, v3 = x0 - k, x1 - k, x2 - k, x3 - k
    m = ((v0 + v1) + (v2 + v3)) * 0.25
    h0, h1, h2, h3 = (v0 - m) * 0.5, (v1 - m) * 0.5, (v2 - m) * 0.5, (v3 - m) * 0.5
    q = (h0 * h0 + h1 * h1) + (h2 * h2 + h3 * h3)
    d = m - mean
    dw = d * w
    mean += dw
    t = w * q + dw * (m - mean)
    var_sum, err = _two_sum(var, (t - var * w) + var_err)
    summed = tl.abs(var_sum) < float("inf")  # as the one-value update (_reduce_kernel)
    var_err = tl.where(summed, err, 0.0)
    var = tl.where(summed, var_sum, var * (1.0 - w) + t)
    k, mean = _two_sum(k, mean)
    return k, mean, var, var_err


@triton.jit
def _reduce_kernel(
    x_ptr, g_ptr, res_ptr, y_ptr, mean_ptr, rstd_or_var_ptr, weight_ptr, bias_ptr, part_ptr,
    out0_ptr, out1_ptr, out2_ptr, dbias_ptr, dweight_ptr, rm_ptr, rv_ptr, nbt_ptr,
    C, S, R, rows_per_split, eps, momentum_hi, momentum_lo,
    sxN, sxC, sxS, sgN, sgC, sgS, srN, srC, srS, syN, syC, syS, smC, ssC, swC, sbC,
    srmC, srvC,
    BACKWARD: tl.constexpr, FROM_VAR: tl.constexpr, FINAL: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr,
    HAS_DBIAS: tl.constexpr, HAS_DWEIGHT: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, MASK_FROM_Y: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    FLAT_ROWS: tl.constexpr, INDEX_64: tl.constexpr, CHANNEL_SPAN: tl.constexpr,
    ROW_STEP: tl.constexpr, SEG_C: tl.constexpr, SEG_S: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
):
    """Per-channel partial reductions over this program's rows [row0, row_end).

    Forward, one-pass Welford per lane (never E[x^2] - E[x]^2), in variance form, with the
    lane's running mean held as an unevaluated sum K + mean, and the variance as var + e,
    both kept with _two_sum:
        n += 1;  v = x - K;  d = v - mean;  mean += d / n
        t = (d / n) * (v - mean);  (var, e) = var + ((t - var / n) + e), with its rounding error
        (where that sum is not finite: var = var * (1 - 1/n) + t, e = 0)
        (K, mean) = (K + mean, its rounding error)
    and the plain sum of x beside it (_finish_stats). The lanes are then merged with
    _merge_lanes. Why: a float32 running mean near 1e4 moves in steps of 1e-3, which
    cost x = 1e4 + randn its variance's precision; a fixed shift (the channel's first
    value, say) fixes that only while the shift is not itself an outlier. Re-centred
    every step, K is always the running mean, wherever the outliers are. The variance's
    steps are small against it (about var / n), and rounded sums of them drift by
    ~sqrt(n) ulps: after an outlier, 4096 values of one lane left var 1e-5 off in
    float32 (var * (1 - 1/n) + ..., as M2 += ...); summed with its error, 7e-8. The
    update's product (d / n) * (v - mean) is at most d^2 / 4: no overflow for |x| below
    ~1.8e19, and past that an inf, never an inf - inf.
    While whole groups of _GROUP tiles are left, each lane takes 4 values per step
    (_group_update: ~15 instructions per value, not ~35) from an origin K that starts at
    its first value; the tiles after the last group take the one-value update above.
    Backward, with xhat = (x - mean) * rstd and g the gradient reaching the BN output
    (dL/dy, or through a fused activation g * act'(z): _epilogue_grad):
        a = sum g (= dbeta),  b = sum g * xhat (= dgamma)
    The results go to part[i, split, c]: forward i = 0..3 (K, mean, var, sum), backward
    i = 0, 1 (sum g, sum g*xhat). FINAL (one split holds every row: no merge launch): the
    merge kernel's outputs instead, written here (out0..2, dbias and dweight, and the
    running statistics).
    """
    channel, holds, lane = _lanes(C, S, BLOCK_C, BLOCK_R, CHANNEL_SPAN)
    row0, row_end = _program_rows(R, rows_per_split)
    c, c_mask = _out_channels(C, BLOCK_C, SEG_C, CHANNEL_SPAN)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    values = R  # a channel's values: R rows, or (channel blocks) R samples of S
    if CHANNEL_SPAN > 0:
        values = R * S

    a = tl.zeros([channel.shape[0], BLOCK_R], ACC)
    b = tl.zeros([channel.shape[0], BLOCK_R], ACC)
    if BACKWARD:
        mean, rstd = _channel_stats(mean_ptr, rstd_or_var_ptr, channel, holds, eps, smC, ssC,
                                    FROM_VAR, ACC)
        scale, shift = _affine(weight_ptr, bias_ptr, rstd, channel, holds, swC, sbC,
                               HAS_WEIGHT, HAS_BIAS, ACC)
        z_mean, shift = _z_mean_shift(mean, scale, shift)
    else:  # (K, the lanes' origin, starts at their first values: below)
        b_err = tl.zeros([channel.shape[0], BLOCK_R], ACC)
        total = tl.zeros([channel.shape[0], BLOCK_R], ACC)
        count = tl.zeros([1, BLOCK_R], ACC)
        steps = tl.zeros([1, 1], ACC)  # the tiles this program has read
    if BACKWARD:
        for start in range(row0, row_end, ROW_STEP):
            mask = _tile_mask(start, lane, holds, row_end, CHANNEL_SPAN)
            x = _load_tile(x_ptr, start, lane, channel, mask, S, sxN, sxC, sxS, FLAT_ROWS,
                           CHANNEL_SPAN, INDEX_64, ACC)
            g = _load_tile(g_ptr, start, lane, channel, mask, S, sgN, sgC, sgS, FLAT_ROWS,
                           CHANNEL_SPAN, INDEX_64, ACC)
            if ACTIVATION != _IDENTITY:
                res_offsets = _tile_offsets(start, lane, channel, S, srN, srC, srS, FLAT_ROWS,
                                            CHANNEL_SPAN, INDEX_64)
                y_offsets = _tile_offsets(start, lane, channel, S, syN, syC, syS, FLAT_ROWS,
                                          CHANNEL_SPAN, INDEX_64)
                g = _epilogue_grad(g, x, z_mean, scale, shift, res_ptr, res_offsets, y_ptr,
                                   y_offsets, mask, ACTIVATION, HAS_RESIDUAL, MASK_FROM_Y, ACC)
            a += g
            b += g * ((x - mean) * rstd)
    else:
        # Whole groups of _GROUP tiles first: every lane active (no row mask), and one
        # update per _GROUP values (_group_update); then the tail, one tile at a time.
        group_rows = _GROUP * ROW_STEP
        group_end = row0 + (row_end - row0) // group_rows * group_rows
        lanes = tl.broadcast_to(holds, [channel.shape[0], BLOCK_R])
        # The shift starts at each lane's first value (0 for a lane without rows), so that
        # the first group's x - K is exact too (Sterbenz): from K = 0, the group's mean
        # of x = 1e4 + randn would round at 1e4's scale, and that error would reach the
        # variance through every later combine. (The one-value update makes K its first
        # value itself: this changes nothing there.)
        k = _load_tile(x_ptr, row0, lane, channel,
                       lanes & _rows_held(row0, lane, row_end, CHANNEL_SPAN), S, sxN, sxC,
                       sxS, FLAT_ROWS, CHANNEL_SPAN, INDEX_64, ACC)
        for start in range(row0, group_end, group_rows):
            x0 = _load_tile(x_ptr, start, lane, channel, lanes, S, sxN, sxC, sxS, FLAT_ROWS,
                            CHANNEL_SPAN, INDEX_64, ACC)
            x1 = _load_tile(x_ptr, start + ROW_STEP, lane, channel, lanes, S, sxN, sxC, sxS,
                            FLAT_ROWS, CHANNEL_SPAN, INDEX_64, ACC)
            x2 = _load_tile(x_ptr, start + 2 * ROW_STEP, lane, channel, lanes, S, sxN, sxC,
                            sxS, FLAT_ROWS, CHANNEL_SPAN, INDEX_64, ACC)
            x3 = _load_tile(x_ptr, start + 3 * ROW_STEP, lane, channel, lanes, S, sxN, sxC,
                            sxS, FLAT_ROWS, CHANNEL_SPAN, INDEX_64, ACC)
            total += (x0 + x1) + (x2 + x3)
            count += _GROUP
            steps += _GROUP
            k, a, b, b_err = _group_update(x0, x1, x2, x3, k, a, b, b_err, _GROUP / steps)
        for start in range(group_end, row_end, ROW_STEP):
            r_mask = _rows_held(start, lane, row_end, CHANNEL_SPAN)
            mask = _tile_mask(start, lane, holds, row_end, CHANNEL_SPAN)
            x = _load_tile(x_ptr, start, lane, channel, mask, S, sxN, sxC, sxS, FLAT_ROWS,
                           CHANNEL_SPAN, INDEX_64, ACC)
            v = x - k
            total += x
            count += r_mask.to(ACC)
            # 1 / count, one division per tile: a lane active in this tile was active in
            # every earlier one (rows only run out), so its count is the tile's number;
            # an inactive lane's update is masked out below
            steps += 1.0
            inv = 1.0 / steps
            delta = v - a
            a += tl.where(r_mask, delta * inv, 0.0)
            t = (delta * inv) * (v - a)
            var_sum, var_err = _two_sum(b, (t - b * inv) + b_err)
            # not finite: an overflow (|x| near 1e19) or a NaN: the plain update, in which
            # inf stays inf and NaN stays NaN (the compensation would make both NaN)
            summed = tl.abs(var_sum) < float("inf")
            b_err = tl.where(r_mask, tl.where(summed, var_err, 0.0), b_err)
            b = tl.where(r_mask, tl.where(summed, var_sum, b * (1.0 - inv) + t), b)
            k, a = _two_sum(k, a)

    if BACKWARD:
        sum_g = tl.sum(_by_channel(a, S, 0.0, SEG_C, SEG_S, CHANNEL_SPAN), axis=1)
        sum_gx = tl.sum(_by_channel(b, S, 0.0, SEG_C, SEG_S, CHANNEL_SPAN), axis=1)
        if FINAL:
            _store_grad_sums(c, c_mask, sum_g, sum_gx, out0_ptr, out1_ptr, dbias_ptr,
                             dweight_ptr, HAS_DBIAS, HAS_DWEIGHT)
        else:
            tl.store(part_ptr + split * C + c, sum_g, mask=c_mask)
            tl.store(part_ptr + (num_splits + split) * C + c, sum_gx, mask=c_mask)
    else:
        counts = tl.broadcast_to(count, [channel.shape[0], BLOCK_R]).to(tl.float64)
        # The lanes merge in float64 (once per program, not per element): their shifts
        # differ by up to the data's range, and float32 merges would round at its scale.
        f64 = tl.float64
        out_k, out_mean, out_var, out_sum = _merge_lanes(
            _by_channel(k.to(f64), S, 0.0, SEG_C, SEG_S, CHANNEL_SPAN),
            _by_channel(a.to(f64), S, 0.0, SEG_C, SEG_S, CHANNEL_SPAN),
            _by_channel(b.to(f64) + b_err.to(f64), S, 0.0, SEG_C, SEG_S, CHANNEL_SPAN),
            _by_channel(counts, S, 0.0, SEG_C, SEG_S, CHANNEL_SPAN),
            _by_channel(total.to(f64), S, 0.0, SEG_C, SEG_S, CHANNEL_SPAN))
        if FINAL:
            _store_batch_stats(c, c_mask, out_k, out_mean, out_var, out_sum,
                               tl.cast(values, f64), eps, values, out0_ptr, out1_ptr,
                               out2_ptr, rm_ptr, rv_ptr, nbt_ptr, momentum_hi, momentum_lo,
                               srmC, srvC, UPDATE_RUNNING, CUMULATIVE, ACC)
        else:
            tl.store(part_ptr + split * C + c, out_k, mask=c_mask)
            tl.store(part_ptr + (num_splits + split) * C + c, out_mean, mask=c_mask)
            tl.store(part_ptr + (2 * num_splits + split) * C + c, out_var, mask=c_mask)
            tl.store(part_ptr + (3 * num_splits + split) * C + c, out_sum, mask=c_mask)


@triton.jit
def _store_grad_sums(c, c_mask, sum_g, sum_gx, out0_ptr, out1_ptr, dbias_ptr, dweight_ptr,
                     HAS_DBIAS: tl.constexpr, HAS_DWEIGHT: tl.constexpr):
    """The backward's sums: out0 = sum g, out1 = sum g*xhat in the accumulation dtype
    (the three-path dx reads them), and again, rounded to nearest even (as torch's .to()),
    into dbias and dweight where given: half-precision parameters' gradients."""
    tl.store(out0_ptr + c, sum_g, mask=c_mask)
    tl.store(out1_ptr + c, sum_gx, mask=c_mask)
    if HAS_DBIAS:
        tl.store(dbias_ptr + c, sum_g.to(dbias_ptr.dtype.element_ty), mask=c_mask)
    if HAS_DWEIGHT:
        tl.store(dweight_ptr + c, sum_gx.to(dweight_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _merge_kernel(
    part_ptr, out0_ptr, out1_ptr, out2_ptr, dbias_ptr, dweight_ptr, rm_ptr, rv_ptr, nbt_ptr,
    C, R, rows_per_split, num_splits, eps, momentum_hi, momentum_lo, srmC, srvC,
    BACKWARD: tl.constexpr, UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr,
    HAS_DBIAS: tl.constexpr, HAS_DWEIGHT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    """Merges the splits of _reduce_kernel, in a fixed order (bitwise reproducible): steps
    of BLOCK_S splits, one after another, each step's splits merged as a tree.

    Forward: _welford_combine over the splits' (K, mean, var, sum), split k holding
    n_k = min(rows_per_split, R - k*rows_per_split) rows (every earlier split is full): a
    step's [BLOCK_C, BLOCK_S] tile by _merge_lanes (pairwise, log2(BLOCK_S) rounds), then
    into the running result; then out0 = mean (_finish_stats), out1 = rstd =
    1/sqrt(var + eps), out2 = var (biased), and (UPDATE_RUNNING) the running statistics
    (_store_batch_stats). In float64, as the lanes' merge in _reduce_kernel. A split past
    the last (a step's padding) holds n = 0: _welford_combine skips it.
    Backward: out0 = sum g (dbeta), out1 = sum g*xhat (dgamma), each step's tile summed
    (and rounded into dbias, dweight: _store_grad_sums).
    Why steps of a tree, not one split after another: the merge is a serial chain, and
    528 splits (C = 64 at 112x112 over an H100) made 528 dependent steps.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    f64 = tl.float64
    a = tl.zeros([BLOCK_C], ACC)
    b = tl.zeros([BLOCK_C], ACC)
    k = tl.zeros([BLOCK_C], f64)
    mean = tl.zeros([BLOCK_C], f64)
    var = tl.zeros([BLOCK_C], f64)
    total = tl.zeros([BLOCK_C], f64)
    n = tl.zeros([BLOCK_C], f64)
    for j0 in range(0, num_splits, BLOCK_S):
        j = j0 + tl.arange(0, BLOCK_S)
        mask = c_mask[:, None] & (j < num_splits)[None, :]
        offsets = j[None, :] * C + c[:, None]  # part[i, j, c]: c contiguous
        if BACKWARD:
            a += tl.sum(tl.load(part_ptr + offsets, mask=mask, other=0.0), axis=1)
            b += tl.sum(tl.load(part_ptr + num_splits * C + offsets, mask=mask, other=0.0),
                        axis=1)
        else:
            rows_before = tl.cast(j, tl.int64) * rows_per_split
            n_j = tl.where(j < num_splits, tl.minimum(rows_per_split, R - rows_before), 0)
            n_tile = tl.zeros([BLOCK_C, BLOCK_S], f64) + n_j.to(f64)[None, :]
            k_s, mean_s, var_s, total_s = _merge_lanes(
                tl.load(part_ptr + offsets, mask=mask, other=0.0).to(f64),
                tl.load(part_ptr + num_splits * C + offsets, mask=mask, other=0.0).to(f64),
                tl.load(part_ptr + 2 * num_splits * C + offsets, mask=mask, other=0.0).to(f64),
                n_tile,
                tl.load(part_ptr + 3 * num_splits * C + offsets, mask=mask, other=0.0).to(f64))
            k, mean, var, n, total = _welford_combine(k, mean, var, n, total, k_s, mean_s,
                                                      var_s, tl.sum(n_tile, axis=1), total_s)
    if BACKWARD:
        _store_grad_sums(c, c_mask, a, b, out0_ptr, out1_ptr, dbias_ptr, dweight_ptr,
                         HAS_DBIAS, HAS_DWEIGHT)
    else:
        _store_batch_stats(c, c_mask, k, mean, var, total, n, eps, R, out0_ptr, out1_ptr,
                           out2_ptr, rm_ptr, rv_ptr, nbt_ptr, momentum_hi, momentum_lo,
                           srmC, srvC, UPDATE_RUNNING, CUMULATIVE, ACC)


@triton.jit
def _apply_kernel(
    x_ptr, g_ptr, res_ptr, y_ptr, out_ptr, dres_ptr, mean_ptr, rstd_or_var_ptr, weight_ptr,
    bias_ptr, sum_g_ptr, sum_gx_ptr, count_ptr, nbt_ptr,
    C, S, R, rows_per_split, eps, count,
    sxN, sxC, sxS, sgN, sgC, sgS, srN, srC, srS, syN, syC, syS, soN, soC, soS, sdN, sdC, sdS,
    smC, ssC, swC, sbC,
    BACKWARD: tl.constexpr, BATCH_STATS: tl.constexpr, FROM_VAR: tl.constexpr,
    COUNT_PER_CHANNEL: tl.constexpr, COUNT_BATCH: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, MASK_FROM_Y: tl.constexpr,
    HAS_DRES: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    FLAT_ROWS: tl.constexpr, INDEX_64: tl.constexpr, CHANNEL_SPAN: tl.constexpr,
    ROW_STEP: tl.constexpr, SEG_C: tl.constexpr, SEG_S: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
):
    """The elementwise pass, one read of each input and one write of each output.

    Forward:   y  = act(z),  z = (x - mean) * (gamma * rstd) + beta (+ residual)
    Backward: first g = dL/dz = dL/dy * act'(z), z recomputed (written to dres, the
    residual's gradient, with HAS_DRES); then, batch statistics (the direct, mean and
    variance paths):
               dx = gamma * rstd * (g - sum(g)/m - xhat * sum(g*xhat)/m)
               m = count (N*S), or count_ptr[c] (COUNT_PER_CHANNEL: SyncBatchNorm's global
               sums and count)
    Backward, constant statistics (eval):
               dx = gamma * rstd * g
    COUNT_BATCH (a module's training forward): program (0, 0) adds 1 to num_batches_tracked,
    after the launch that read it (_store_batch_stats), so no launch reads a half-updated
    counter.
    """
    channel, holds, lane = _lanes(C, S, BLOCK_C, BLOCK_R, CHANNEL_SPAN)
    row0, row_end = _program_rows(R, rows_per_split)
    if COUNT_BATCH:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)

    mean, rstd = _channel_stats(mean_ptr, rstd_or_var_ptr, channel, holds, eps, smC, ssC,
                                FROM_VAR, ACC)
    scale, shift = _affine(weight_ptr, bias_ptr, rstd, channel, holds, swC, sbC,
                           HAS_WEIGHT, HAS_BIAS, ACC)
    z_mean, shift = _z_mean_shift(mean, scale, shift)
    if BACKWARD:
        if BATCH_STATS:
            if COUNT_PER_CHANNEL:
                m = tl.load(count_ptr + channel, mask=holds, other=1.0)
            else:
                m = count
            mean_g = tl.load(sum_g_ptr + channel, mask=holds, other=0.0) / m
            mean_gx = tl.load(sum_gx_ptr + channel, mask=holds, other=0.0) / m

    for start in range(row0, row_end, ROW_STEP):
        mask = _tile_mask(start, lane, holds, row_end, CHANNEL_SPAN)
        res_offsets = _tile_offsets(start, lane, channel, S, srN, srC, srS, FLAT_ROWS,
                                    CHANNEL_SPAN, INDEX_64)
        if BACKWARD:
            g = _load_tile(g_ptr, start, lane, channel, mask, S, sgN, sgC, sgS, FLAT_ROWS,
                           CHANNEL_SPAN, INDEX_64, ACC)
            if ACTIVATION != _IDENTITY:
                x = _load_tile(x_ptr, start, lane, channel, mask, S, sxN, sxC, sxS, FLAT_ROWS,
                               CHANNEL_SPAN, INDEX_64, ACC)
                y_offsets = _tile_offsets(start, lane, channel, S, syN, syC, syS, FLAT_ROWS,
                                          CHANNEL_SPAN, INDEX_64)
                g = _epilogue_grad(g, x, z_mean, scale, shift, res_ptr, res_offsets, y_ptr,
                                   y_offsets, mask, ACTIVATION, HAS_RESIDUAL, MASK_FROM_Y, ACC)
                if HAS_DRES:
                    d_offsets = _tile_offsets(start, lane, channel, S, sdN, sdC, sdS,
                                              FLAT_ROWS, CHANNEL_SPAN, INDEX_64)
                    tl.store(dres_ptr + d_offsets, g.to(dres_ptr.dtype.element_ty), mask=mask)
            if BATCH_STATS:
                if ACTIVATION == _IDENTITY:
                    x = _load_tile(x_ptr, start, lane, channel, mask, S, sxN, sxC, sxS,
                                   FLAT_ROWS, CHANNEL_SPAN, INDEX_64, ACC)
                xhat = (x - mean) * rstd
                out = scale * (g - mean_g - xhat * mean_gx)
            else:
                out = scale * g
        else:
            x = _load_tile(x_ptr, start, lane, channel, mask, S, sxN, sxC, sxS, FLAT_ROWS,
                           CHANNEL_SPAN, INDEX_64, ACC)
            z = _pre_activation(x, z_mean, scale, shift, res_ptr, res_offsets, mask,
                                HAS_RESIDUAL, ACC)
            out = _activation(z, ACTIVATION)
        o_offsets = _tile_offsets(start, lane, channel, S, soN, soC, soS, FLAT_ROWS,
                                  CHANNEL_SPAN, INDEX_64)
        tl.store(out_ptr + o_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
