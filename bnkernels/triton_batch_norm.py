"""Triton kernels for BatchNorm, then their launchers (the `triton` backend).

A tensor is read as (N, C, S) through strides (see layout.py); a channel's m = N*S values
are its "rows". Three kernels serve the three passes of ../shared/BN_MATH.md:

  _partial_stats_kernel  grid (channel blocks, splits). Each program reduces its share of
                         the rows of a block of channels: Welford (mean, M2) forward,
                         (sum g, sum g*xhat) backward.
  _merge_kernel          grid (channel blocks,). Merges the splits in a fixed order, so the
                         result is bitwise reproducible (no atomics).
  _apply_kernel          grid (channel blocks, splits). The elementwise pass: normalize +
                         affine forward, the input gradient backward.

Training forward = partial + merge + apply (x is read twice, y written once); eval forward
= apply; backward = partial + merge + apply with batch statistics, apply alone for the input
gradient through running statistics. NCHW and channels_last differ only in constexpr
switches (FLAT_ROWS) and the tile shape the launch plan picks.
"""
from __future__ import annotations

import collections
import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .layout import (MERGE_BLOCK_C, acc_dtype, alloc_output, kernel_layout, kernel_ready,
                     launch_plan, ncs_shape, ncs_strides)

# Kernel launches by kernel name: the tests read it to prove the kernels ran.
launch_counts: collections.Counter = collections.Counter()


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _tile_offsets(r, c, S, sN, sC, sS, FLAT_ROWS: tl.constexpr, INDEX_64: tl.constexpr):
    """Offsets of the [BLOCK_C, BLOCK_R] tile of channels c and rows r = n*S + s."""
    if INDEX_64:
        r = r.to(tl.int64)
        c = c.to(tl.int64)
    if FLAT_ROWS:
        row_offsets = r * sS  # sS is the row stride here (layout.kernel_layout)
    else:
        n = r // S
        row_offsets = n * sN + (r - n * S) * sS
    return c[:, None] * sC + row_offsets[None, :]


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
def _channel_stats(mean_ptr, stat_ptr, c, c_mask, eps,
                   FROM_RUNNING: tl.constexpr, ACC: tl.constexpr):
    """Per-channel (mean, rstd): the saved batch statistics, or rstd = 1/sqrt(var + eps)
    from the running variance."""
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(ACC)
    stat = tl.load(stat_ptr + c, mask=c_mask, other=1.0).to(ACC)
    if FROM_RUNNING:
        stat = _inv_std(stat, eps, ACC)
    return mean, stat


@triton.jit
def _program_share(C, R, rows_per_split, BLOCK_C: tl.constexpr):
    """This program's channels (block program_id(0)) and rows [row0, row_end) (split
    program_id(1))."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    row0 = tl.program_id(1) * rows_per_split
    return c, c < C, row0, tl.minimum(row0 + rows_per_split, R)


@triton.jit
def _channel_shift(x_ptr, c, c_mask, sxC, INDEX_64: tl.constexpr, ACC: tl.constexpr):
    """x[0, c, 0]: the shift K the forward statistics are accumulated around."""
    if INDEX_64:
        c = c.to(tl.int64)
    return tl.load(x_ptr + c * sxC, mask=c_mask, other=0.0).to(ACC)


@triton.jit
def _welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan, Golub & LeVeque: merge two (mean, M2, n) partials exactly; empty ones are a no-op."""
    n = n_a + n_b
    w_b = tl.where(n == 0, 0.0, n_b / tl.where(n == 0, 1.0, n))
    delta = mean_b - mean_a
    return mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b, n


@triton.jit
def _partial_stats_kernel(
    x_ptr, g_ptr, mean_ptr, stat_ptr, part_ptr,
    C, S, R, rows_per_split, eps,
    sxN, sxC, sxS, sgN, sgC, sgS,
    BACKWARD: tl.constexpr, FROM_RUNNING: tl.constexpr,
    FLAT_ROWS: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
):
    """Per-channel partial reductions over this program's rows [row0, row_end).

    Forward, one-pass Welford per lane (never E[x^2] - E[x]^2) on x - K, K the channel's
    first element (_channel_shift):
        n += 1;  d = x - mean;  mean += d / n;  M2 += d * (x - mean)
    then the lanes are merged with _welford_combine. The shift keeps the running means
    small: a float32 mean near 1e4 moves in steps of 1e-3, which cost x = 1e4 + randn
    a 4e-4 relative error in its variance before it.
    Backward, with xhat = (x - mean) * rstd:
        a = sum g (= dbeta),  b = sum g * xhat (= dgamma)
    The results go to part[0, split, c] (mean | sum g) and part[1, split, c] (M2 | sum g*xhat).
    """
    c, c_mask, row0, row_end = _program_share(C, R, rows_per_split, BLOCK_C)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)

    a = tl.zeros([BLOCK_C, BLOCK_R], ACC)
    b = tl.zeros([BLOCK_C, BLOCK_R], ACC)
    count = tl.zeros([1, BLOCK_R], ACC)
    if BACKWARD:
        mean, rstd = _channel_stats(mean_ptr, stat_ptr, c, c_mask, eps, FROM_RUNNING, ACC)
    else:
        shift = _channel_shift(x_ptr, c, c_mask, sxC, INDEX_64, ACC)
    for start in range(row0, row_end, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        r_mask = (r < row_end)[None, :]
        mask = c_mask[:, None] & r_mask
        x_offsets = _tile_offsets(r, c, S, sxN, sxC, sxS, FLAT_ROWS, INDEX_64)
        x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(ACC)
        if BACKWARD:
            g_offsets = _tile_offsets(r, c, S, sgN, sgC, sgS, FLAT_ROWS, INDEX_64)
            g = tl.load(g_ptr + g_offsets, mask=mask, other=0.0).to(ACC)
            a += g
            b += g * ((x - mean[:, None]) * rstd[:, None])
        else:
            x -= shift[:, None]
            count += r_mask.to(ACC)
            delta = x - a
            a += tl.where(r_mask, delta / tl.maximum(count, 1.0), 0.0)
            b += tl.where(r_mask, delta * (x - a), 0.0)

    if BACKWARD:
        out_a = tl.sum(a, axis=1)
        out_b = tl.sum(b, axis=1)
    else:
        counts = tl.broadcast_to(count, [BLOCK_C, BLOCK_R])
        out_a, out_b, _ = tl.reduce((a, b, counts), 1, _welford_combine)
    tl.store(part_ptr + split * C + c, out_a, mask=c_mask)
    tl.store(part_ptr + (num_splits + split) * C + c, out_b, mask=c_mask)


@triton.jit
def _merge_kernel(
    part_ptr, out0_ptr, out1_ptr, out2_ptr, x_ptr,
    C, R, rows_per_split, num_splits, eps, sxC,
    BACKWARD: tl.constexpr, INDEX_64: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Merges the splits of _partial_stats_kernel, in split order.

    Forward (Chan et al.; split k holds n_k = min(rows_per_split, R - k*rows_per_split) rows):
        n = n_a + n_b;  d = mean_b - mean_a;  mean = mean_a + d*n_b/n;  M2 = M2_a + M2_b + d^2*n_a*n_b/n
        out0 = mean = K + merged mean of x - K, out1 = rstd = 1/sqrt(var + eps),
        out2 = var = M2 / R (biased)
    Backward: out0 = sum g (dbeta), out1 = sum g*xhat (dgamma).
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    a = tl.zeros([BLOCK_C], ACC)
    b = tl.zeros([BLOCK_C], ACC)
    for k in range(0, num_splits):
        part_a = tl.load(part_ptr + k * C + c, mask=c_mask, other=0.0)
        part_b = tl.load(part_ptr + (num_splits + k) * C + c, mask=c_mask, other=0.0)
        if BACKWARD:
            a += part_a
            b += part_b
        else:
            rows_before = tl.cast(k, tl.int64) * rows_per_split  # every earlier split is full
            n_a = rows_before.to(ACC)
            n_b = tl.minimum(rows_per_split, R - rows_before).to(ACC)
            w_b = n_b / (n_a + n_b)
            delta = part_a - a
            a += delta * w_b
            b += part_b + delta * delta * n_a * w_b
    if BACKWARD:
        tl.store(out0_ptr + c, a, mask=c_mask)
        tl.store(out1_ptr + c, b, mask=c_mask)
    else:
        var = b / R
        mean = a + _channel_shift(x_ptr, c, c_mask, sxC, INDEX_64, ACC)
        tl.store(out0_ptr + c, mean, mask=c_mask)
        tl.store(out1_ptr + c, _inv_std(var, eps, ACC), mask=c_mask)
        tl.store(out2_ptr + c, var, mask=c_mask)


@triton.jit
def _apply_kernel(
    x_ptr, g_ptr, out_ptr, mean_ptr, stat_ptr, weight_ptr, bias_ptr, sum_g_ptr, sum_gx_ptr,
    C, S, R, rows_per_split, eps, sum_count,
    sxN, sxC, sxS, sgN, sgC, sgS, soN, soC, soS,
    BACKWARD: tl.constexpr, BATCH_STATS: tl.constexpr, FROM_RUNNING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    FLAT_ROWS: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
):
    """The elementwise pass, one read of each input and one write.

    Forward:   y  = (x - mean) * (gamma * rstd) + beta
    Backward, batch statistics (the direct, mean and variance paths):
               dx = gamma * rstd * (g - sum(g)/m - xhat * sum(g*xhat)/m)
               m = sum_count: R here; SyncBatchNorm passes the global means, already
               divided by the global count, with sum_count = 1 (an int: exact in float64)
    Backward, running statistics (mean and rstd are constants):
               dx = gamma * rstd * g
    (x - mean) is formed before scaling: for |mean| >> std, x*a + b would cancel.
    """
    c, c_mask, row0, row_end = _program_share(C, R, rows_per_split, BLOCK_C)

    mean, rstd = _channel_stats(mean_ptr, stat_ptr, c, c_mask, eps, FROM_RUNNING, ACC)
    if HAS_WEIGHT:
        scale = tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(ACC) * rstd
    else:
        scale = rstd
    if BACKWARD:
        if BATCH_STATS:
            mean_g = tl.load(sum_g_ptr + c, mask=c_mask, other=0.0) / sum_count
            mean_gx = tl.load(sum_gx_ptr + c, mask=c_mask, other=0.0) / sum_count
    else:
        if HAS_BIAS:
            shift = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(ACC)
        else:
            shift = tl.zeros([BLOCK_C], ACC)

    for start in range(row0, row_end, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        mask = c_mask[:, None] & (r < row_end)[None, :]
        if BACKWARD:
            g_offsets = _tile_offsets(r, c, S, sgN, sgC, sgS, FLAT_ROWS, INDEX_64)
            g = tl.load(g_ptr + g_offsets, mask=mask, other=0.0).to(ACC)
            if BATCH_STATS:
                x_offsets = _tile_offsets(r, c, S, sxN, sxC, sxS, FLAT_ROWS, INDEX_64)
                x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(ACC)
                xhat = (x - mean[:, None]) * rstd[:, None]
                out = scale[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
            else:
                out = scale[:, None] * g
        else:
            x_offsets = _tile_offsets(r, c, S, sxN, sxC, sxS, FLAT_ROWS, INDEX_64)
            x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(ACC)
            out = (x - mean[:, None]) * scale[:, None] + shift[:, None]
        o_offsets = _tile_offsets(r, c, S, soN, soC, soS, FLAT_ROWS, INDEX_64)
        tl.store(out_ptr + o_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers

_GL = {torch.float32: tl.float32, torch.float64: tl.float64}


def _launch(kernel, grid, *args, **meta):
    launch_counts[kernel.fn.__name__] += 1
    device = args[0].device
    # Triton launches on the current device: make it the tensors' one (x on cuda:1, say).
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, **meta)


class _Launch:
    """What the three kernels of one call share: shapes, strides, tile and grid."""

    def __init__(self, x: torch.Tensor, *others: torch.Tensor):
        self.n, self.c, self.s = ncs_shape(x)
        self.rows = self.n * self.s
        self.acc = acc_dtype(x.dtype)
        channels_fast = ncs_strides(x)[1] == 1 and self.c > 1
        self.plan = launch_plan(self.n, self.c, self.s, channels_fast, x.device)
        self.layout = kernel_layout((x,) + others, self.plan.block_c, self.plan.block_r)
        self.grid = (self.plan.c_blocks, self.plan.splits)

    def meta(self, **switches):
        return dict(FLAT_ROWS=self.layout.flat_rows, INDEX_64=self.layout.index_64,
                    BLOCK_C=self.plan.block_c, BLOCK_R=self.plan.block_r, ACC=_GL[self.acc],
                    num_warps=self.plan.num_warps, **switches)

    def reduce(self, x, g, mean, stat, eps, backward, from_running):
        """Partial reductions then their merge: (mean, rstd, var) or (sum g, sum g*xhat)."""
        plan, strides = self.plan, self.layout.strides
        part = torch.empty((2, plan.splits, self.c), dtype=self.acc, device=x.device)
        g_strides = strides[1] if backward else strides[0]
        _launch(_partial_stats_kernel, self.grid, x, g, mean, stat, part,
                self.c, self.s, self.rows, plan.rows_per_split, eps,
                *strides[0], *g_strides,
                **self.meta(BACKWARD=backward, FROM_RUNNING=from_running))
        outs = tuple(torch.empty(self.c, dtype=self.acc, device=x.device)
                     for _ in range(2 if backward else 3))
        block = min(MERGE_BLOCK_C, triton.next_power_of_2(self.c))
        out2 = outs[2] if len(outs) == 3 else outs[0]  # the backward merge has no third output
        _launch(_merge_kernel, (triton.cdiv(self.c, block),), part, outs[0], outs[1], out2, x,
                self.c, self.rows, plan.rows_per_split, plan.splits, eps, strides[0][1],
                BACKWARD=backward, INDEX_64=self.layout.index_64, BLOCK_C=block,
                ACC=_GL[self.acc])
        return outs


def forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
            training: bool, eps: float) -> Tuple[torch.Tensor, ...]:
    """(y, mean, rstd, biased var); the statistics are empty in eval mode."""
    y = alloc_output(x)
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:
        zeros = [torch.zeros(c if training else 0, dtype=acc, device=x.device) for _ in range(3)]
        return (y, *zeros)
    x = kernel_ready(x)
    call = _Launch(x, y)
    if training:
        stats = call.reduce(x, x, x, x, eps, backward=False, from_running=False)
        stats_src = stats[:2]  # mean, rstd
    else:
        stats = tuple(torch.empty(0, dtype=acc, device=x.device) for _ in range(3))
        stats_src = (running_mean, running_var)
    sx = call.layout.strides[0]
    _launch(_apply_kernel, call.grid, x, x, y, *stats_src,
            weight if weight is not None else x, bias if bias is not None else x, x, x,
            call.c, call.s, call.rows, call.plan.rows_per_split, eps, 1,
            *sx, *sx, *call.layout.strides[1],
            **call.meta(BACKWARD=False, BATCH_STATS=training, FROM_RUNNING=not training,
                        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None))
    return (y, *stats)


def backward(grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
             mean: torch.Tensor, stat: torch.Tensor, training: bool, eps: float,
             need_dx: bool, need_sums: bool) -> Tuple[torch.Tensor, ...]:
    """(dx, sum g, sum g*xhat). mean/stat: the saved mean/rstd (training) or the running
    mean/var (eval). Results not asked for come back empty."""
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    empty = torch.empty(0, dtype=acc, device=x.device)
    dx = alloc_output(x) if need_dx else empty
    if x.numel() == 0:
        zeros = torch.zeros(c, dtype=acc, device=x.device)
        return dx, zeros, zeros.clone()
    x, grad_out = kernel_ready(x), kernel_ready(grad_out)
    call = _Launch(x, grad_out, dx) if need_dx else _Launch(x, grad_out)
    sum_g, sum_gx = empty, empty.clone()
    if training or need_sums:
        sum_g, sum_gx = call.reduce(x, grad_out, mean, stat, eps, backward=True,
                                    from_running=not training)
    if need_dx:
        _input_grad(call, grad_out, x, dx, weight, mean, stat, sum_g, sum_gx, eps,
                    call.rows, batch_stats=training, from_running=not training)
    if not need_sums:
        sum_g, sum_gx = empty, empty.clone()
    return dx, sum_g, sum_gx


def _input_grad(call, grad_out, x, dx, weight, mean, stat, sum_g, sum_gx, eps, sum_count,
                batch_stats, from_running):
    strides = call.layout.strides
    _launch(_apply_kernel, call.grid, x, grad_out, dx, mean, stat,
            weight if weight is not None else x, x, sum_g, sum_gx,
            call.c, call.s, call.rows, call.plan.rows_per_split, eps, sum_count,
            *strides[0], *strides[1], *strides[2],
            **call.meta(BACKWARD=True, BATCH_STATS=batch_stats, FROM_RUNNING=from_running,
                        HAS_WEIGHT=weight is not None, HAS_BIAS=False))


def batch_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) per channel, in the accumulation dtype (zeros for an empty x)."""
    if x.numel() == 0:
        zeros = torch.zeros(x.shape[1], dtype=acc_dtype(x.dtype), device=x.device)
        return zeros, zeros.clone()
    x = kernel_ready(x)
    mean, _, var = _Launch(x).reduce(x, x, x, x, 1.0, backward=False, from_running=False)
    return mean, var


def input_grad(grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
               mean: torch.Tensor, var: torch.Tensor, mean_g: torch.Tensor,
               mean_gx: torch.Tensor, eps: float) -> torch.Tensor:
    """dx through batch statistics given from outside (SyncBatchNorm): mean/var the global
    statistics, mean_g/mean_gx the global sum(g)/m and sum(g*xhat)/m."""
    dx = alloc_output(x)
    if x.numel() == 0:
        return dx
    x, grad_out = kernel_ready(x), kernel_ready(grad_out)
    call = _Launch(x, grad_out, dx)
    _input_grad(call, grad_out, x, dx, weight, mean, var, mean_g, mean_gx, eps, 1,
                batch_stats=True, from_running=True)
    return dx
