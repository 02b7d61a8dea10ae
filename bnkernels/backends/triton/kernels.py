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
gradient through constant statistics. On a GPU, persistent.py runs the three as one launch
where persistent_plan.py allows (the second read of x then comes from L2). NCHW and
channels_last differ only in constexpr switches (FLAT_ROWS, CHANNEL_SPAN, S_CONST: NCHW
row tiles divide r // S by a constant, a multiply-high, where a runtime S costs an integer
division per vector) and the tile shape the launch plan picks. The reduce and apply loops
are software-pipelined, STAGES deep (plan.REDUCE_STAGES, plan.APPLY_STAGES).

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
from .tiles import (_by_channel, _lanes, _load_tile, _out_channels, _program_rows,
                    _states_by_channel, _tile_mask, _tile_offsets)
from .welford import _finish_stats, _forward_states, _pool, _welford_combine

# The activation codes, as the constexprs a kernel may read.
_IDENTITY = tl.constexpr(IDENTITY)
_RELU = tl.constexpr(RELU)
_SILU = tl.constexpr(SILU)
_GELU = tl.constexpr(GELU)


# ----------------------------------------------------------------------------- kernels


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
    S_CONST: tl.constexpr, STAGES: tl.constexpr,
    ROW_STEP: tl.constexpr, SEG_C: tl.constexpr, SEG_S: tl.constexpr,
    VEC: tl.constexpr, PARTS: tl.constexpr, SEG_P: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
):
    """Per-channel partial reductions over this program's rows [row0, row_end).

    Forward, one pass of Welford's update (never E[x^2] - E[x]^2) in states of VEC lanes
    (welford.py: _forward_states), each with its running mean held as an unevaluated sum
    K + mean and its variance as var + e, both kept with _two_sum, per step of 4 * VEC
    values of mean m and variance q (of x - K) that are a share w of its values:
        d = m - mean;  mean += d * w
        (var, e) = var + ((w * q + (d * w) * (m - mean) - var * w) + e), with its error
        (where that sum is not finite: var = var * (1 - w) + t, e = 0)
        (K, mean) = (K + mean, its rounding error)
    and the plain sum of x beside it (_finish_stats). The states are then pooled in
    float64 (_pool). Why: a float32 running mean near 1e4 moves in steps of 1e-3, which
    cost x = 1e4 + randn its variance's precision; a fixed shift (the channel's first
    value, say) fixes that only while the shift is not itself an outlier. Re-centred
    every step, K is always the running mean, wherever the outliers are. The variance's
    steps are small against it (about var / n), and rounded sums of them drift by
    ~sqrt(n) ulps: after an outlier, 4096 values of one lane left var 1e-5 off in
    float32 (var * (1 - 1/n) + ..., as M2 += ...); summed with its error, 7e-8. The
    step's terms are bounded by a squared half-range: no overflow for |x| below ~1.8e19,
    and past that an inf, never an inf - inf.
    Backward, with xhat = (x - mean) * rstd and g the gradient reaching the BN output
    (dL/dy, or through a fused activation g * act'(z): _epilogue_grad):
        a = sum g (= dbeta),  b = sum g * xhat (= dgamma)
    The results go to part[i, split, c]: forward i = 0..3 (K, mean, var, sum), backward
    i = 0, 1 (sum g, sum g*xhat). FINAL (one split holds every row: no merge launch): the
    merge kernel's outputs instead, written here (out0..2, dbias and dweight, and the
    running statistics).
    """
    if S_CONST > 0:  # row tiles of NCHW: r // S by a constant (plan.py)
        S = S_CONST
    channel, holds, lane = _lanes(C, S, BLOCK_C, BLOCK_R, CHANNEL_SPAN)
    row0, row_end = _program_rows(R, rows_per_split)
    c, c_mask = _out_channels(C, BLOCK_C, SEG_C, CHANNEL_SPAN)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    values = R  # a channel's values: R rows, or (channel blocks) R samples of S
    if CHANNEL_SPAN > 0:
        values = R * S

    if BACKWARD:
        a = tl.zeros([channel.shape[0], BLOCK_R], ACC)
        b = tl.zeros([channel.shape[0], BLOCK_R], ACC)
        mean, rstd = _channel_stats(mean_ptr, rstd_or_var_ptr, channel, holds, eps, smC, ssC,
                                    FROM_VAR, ACC)
        scale, shift = _affine(weight_ptr, bias_ptr, rstd, channel, holds, swC, sbC,
                               HAS_WEIGHT, HAS_BIAS, ACC)
        z_mean, shift = _z_mean_shift(mean, scale, shift)
    if BACKWARD:
        for start in tl.range(row0, row_end, ROW_STEP, num_stages=STAGES):
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
        (k_a, mean_a, var_a, err_a, n_a, total_a,
         k_b, mean_b, var_b, err_b, n_b, total_b) = _forward_states(
            x_ptr, row0, row_end, lane, channel, holds, S, sxN, sxC, sxS, channel.shape[0],
            FLAT_ROWS, CHANNEL_SPAN, INDEX_64, ROW_STEP, VEC, PARTS, STAGES, ACC)

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
        # The states pool in float64 (once per program, not per element): their origins
        # differ by up to the data's range, and float32 would round at its scale. Their
        # 32-bit values are gathered by channel first (channel blocks), half the bytes.
        f64 = tl.float64
        taken = row_end - row0  # rows, or (channel blocks) samples: every channel's
        taken_values = taken
        if CHANNEL_SPAN > 0:
            taken_values = taken * S
        out_mean, out_var = _pool(
            _states_by_channel(k_a, k_b, S, VEC, SEG_C, SEG_P, PARTS, CHANNEL_SPAN).to(f64),
            _states_by_channel(mean_a, mean_b, S, VEC, SEG_C, SEG_P, PARTS,
                               CHANNEL_SPAN).to(f64),
            _states_by_channel(var_a, var_b, S, VEC, SEG_C, SEG_P, PARTS,
                               CHANNEL_SPAN).to(f64)
            + _states_by_channel(err_a, err_b, S, VEC, SEG_C, SEG_P, PARTS,
                                 CHANNEL_SPAN).to(f64),
            _states_by_channel(n_a, n_b, S, VEC, SEG_C, SEG_P, PARTS, CHANNEL_SPAN).to(f64),
            tl.zeros_like(c).to(f64) + taken_values.to(f64))
        # the plain sum only serves a non-finite mean (_finish_stats): float32 will do
        out_sum = tl.sum(_states_by_channel(total_a, total_b, S, VEC, SEG_C, SEG_P, PARTS,
                                            CHANNEL_SPAN), axis=1)
        if FINAL:
            _store_batch_stats(c, c_mask, out_mean, tl.zeros_like(out_mean), out_var,
                               out_sum, tl.cast(values, f64), eps, values, out0_ptr,
                               out1_ptr, out2_ptr, rm_ptr, rv_ptr, nbt_ptr, momentum_hi,
                               momentum_lo, srmC, srvC, UPDATE_RUNNING, CUMULATIVE, ACC)
        else:
            # the mean as K + mean, two ACC values (float32: the float64 mean to ~48 bits)
            out_k = out_mean.to(ACC)
            tl.store(part_ptr + split * C + c, out_k, mask=c_mask)
            tl.store(part_ptr + (num_splits + split) * C + c, out_mean - out_k.to(f64),
                     mask=c_mask)
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
    """Merges the splits of _reduce_kernel for BLOCK_C channels a program
    (_merge_channels)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    _merge_channels(part_ptr, c, c < C, out0_ptr, out1_ptr, out2_ptr, dbias_ptr, dweight_ptr,
                    rm_ptr, rv_ptr, nbt_ptr, C, R, rows_per_split, num_splits, eps,
                    momentum_hi, momentum_lo, srmC, srvC, BACKWARD, UPDATE_RUNNING,
                    CUMULATIVE, HAS_DBIAS, HAS_DWEIGHT, BLOCK_S, ACC)


@triton.jit
def _merge_channels(
    part_ptr, c, c_mask, out0_ptr, out1_ptr, out2_ptr, dbias_ptr, dweight_ptr, rm_ptr,
    rv_ptr, nbt_ptr, C, R, rows_per_split, num_splits, eps, momentum_hi, momentum_lo,
    srmC, srvC, BACKWARD: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
    CUMULATIVE: tl.constexpr, HAS_DBIAS: tl.constexpr, HAS_DWEIGHT: tl.constexpr,
    BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    """Merges the splits of _reduce_kernel for channels c (those of c_mask), in a fixed
    order (bitwise reproducible): steps of BLOCK_S splits, one after another. The merge
    kernel's body, and the persistent kernel's middle phase (persistent.py).

    Forward: the splits' (K, mean, var, sum), split k holding n_k = min(rows_per_split,
    R - k*rows_per_split) rows (every earlier split is full): a step's [channels, BLOCK_S]
    tile pooled (_pool), then folded into the running result (_welford_combine, once per
    step); then out0 = mean (_finish_stats), out1 = rstd = 1/sqrt(var + eps), out2 = var
    (biased), and (UPDATE_RUNNING) the running statistics (_store_batch_stats). In
    float64, as the lanes' pooling in _reduce_kernel. A split past the last (a step's
    padding) holds n = 0: _pool leaves it out.
    Backward: out0 = sum g (dbeta), out1 = sum g*xhat (dgamma), each step's tile summed
    (and rounded into dbias, dweight: _store_grad_sums).
    Why steps, not one split after another: the merge is a serial chain, and 528 splits
    (C = 64 at 112x112 over an H100) made 528 dependent steps; 256 splits a step make 3.
    """
    f64 = tl.float64
    a = tl.zeros(c.shape, ACC)
    b = tl.zeros(c.shape, ACC)
    k = tl.zeros(c.shape, f64)
    mean = tl.zeros(c.shape, f64)
    var = tl.zeros(c.shape, f64)
    total = tl.zeros(c.shape, f64)
    n = tl.zeros(c.shape, f64)
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
            n_tile = tl.zeros([c.shape[0], BLOCK_S], f64) + n_j.to(f64)[None, :]
            n_s = tl.sum(n_tile, axis=1)
            mean_s, var_s = _pool(
                tl.load(part_ptr + offsets, mask=mask, other=0.0).to(f64),
                tl.load(part_ptr + num_splits * C + offsets, mask=mask, other=0.0).to(f64),
                tl.load(part_ptr + 2 * num_splits * C + offsets, mask=mask, other=0.0).to(f64),
                n_tile, n_s)
            total_s = tl.sum(
                tl.load(part_ptr + 3 * num_splits * C + offsets, mask=mask, other=0.0).to(f64),
                axis=1)
            k, mean, var, n, total = _welford_combine(k, mean, var, n, total, mean_s,
                                                      tl.zeros_like(mean_s), var_s, n_s,
                                                      total_s)
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
    S_CONST: tl.constexpr, STAGES: tl.constexpr,
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
    if S_CONST > 0:  # row tiles of NCHW: r // S by a constant (plan.py)
        S = S_CONST
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

    for start in tl.range(row0, row_end, ROW_STEP, num_stages=STAGES):
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
