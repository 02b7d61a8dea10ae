"""The Triton backend's launchers: a ForwardCall or BackwardCall (backends/contract.py) as
launches of kernels.py's three kernels, shaped by plan.py."""
from __future__ import annotations

import collections
import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ...activations import code
from ...layout import acc_dtype, ncs_shape, ncs_strides
from ..contract import BackwardCall, ForwardCall, GradSums, Normalizer
from .kernels import _apply_kernel, _merge_kernel, _reduce_kernel
from .plan import MERGE_BLOCK_C, kernel_layout, launch_plan

_GL = {torch.float32: tl.float32, torch.float64: tl.float64}
# Each kernel's pass, the key of launch_counts.
PASSES = {_reduce_kernel: "reduce", _merge_kernel: "merge", _apply_kernel: "apply"}
# Kernel launches by pass: the tests read it to prove the kernels ran.
launch_counts: collections.Counter = collections.Counter()


def _launch(kernel, grid, *args, **meta):
    launch_counts[PASSES[kernel]] += 1
    device = args[0].device
    # Triton launches on the current device: make it the tensors' one (x on cuda:1, say).
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, **meta)


# The element tensors' roles, in the order the kernels take their strides.
_ROLES = ("x", "g", "res", "y", "out", "dres")


class Launch:
    """What the kernels of one call share: shapes, tile, grid, and each element tensor's
    strides by role (_ROLES); x's stand in for a role the call has no tensor for."""

    def __init__(self, x: torch.Tensor, **others: Optional[torch.Tensor]):
        self.n, self.c, self.s = ncs_shape(x)
        self.rows = self.n * self.s
        self.acc = acc_dtype(x.dtype)
        self.x = x
        channels_fast = ncs_strides(x)[1] == 1 and self.c > 1
        self.plan = launch_plan(self.n, self.c, self.s, channels_fast, x.device)
        named = {"x": x, **{k: t for k, t in others.items() if t is not None}}
        self.tensors = named
        self.layout = kernel_layout(tuple(named.values()), self.plan.block_c, self.plan.block_r)
        strides = dict(zip(named, self.layout.strides))
        # every role's (sN, sC, sS), flattened in _ROLES order: what the kernels take
        self.element_strides = tuple(v for role in _ROLES
                                     for v in strides.get(role, strides["x"]))
        self.grid = (self.plan.c_blocks, self.plan.splits)

    def pointer(self, role: str) -> torch.Tensor:
        """The role's tensor, or x where the call has none (the kernel's constexpr
        switches leave that pointer unread)."""
        return self.tensors.get(role, self.x)

    def meta(self, activation: int, weight, bias, **switches):
        return dict(ACTIVATION=activation, HAS_RESIDUAL="res" in self.tensors,
                    MASK_FROM_Y="y" in self.tensors,
                    HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                    FLAT_ROWS=self.layout.flat_rows, INDEX_64=self.layout.index_64,
                    BLOCK_C=self.plan.block_c, BLOCK_R=self.plan.block_r, ACC=_GL[self.acc],
                    num_warps=self.plan.num_warps, **switches)

    def reduce(self, eps: float, outs: Tuple[torch.Tensor, ...],
               stats: Optional[Normalizer] = None, weight=None, bias=None, activation: int = 0):
        """The reduce and merge passes, into outs: (mean, rstd, var) of x (stats None), or
        (sum g, sum g*xhat) of g with x normalized by stats. outs: (C,) dense, acc dtype."""
        backward = stats is not None
        x, plan = self.x, self.plan
        part = torch.empty((2 if backward else 4, plan.splits, self.c), dtype=self.acc,
                           device=x.device)
        mean, spread = (stats.mean, _spread_of(stats)) if backward else (None, None)
        reduce_roles = ("x", "g", "res", "y")  # the reduce kernel reads no output
        _launch(_reduce_kernel, self.grid, *(self.pointer(r) for r in reduce_roles),
                _or_x(mean, x), _or_x(spread, x), _or_x(weight, x), _or_x(bias, x), part,
                self.c, self.s, self.rows, plan.rows_per_split, eps,
                *self.element_strides[:3 * len(reduce_roles)],
                *_channel_strides(mean, spread, weight, bias),
                **self.meta(activation, weight, bias, BACKWARD=backward,
                            FROM_VAR=backward and stats.var is not None))
        block = min(MERGE_BLOCK_C, triton.next_power_of_2(self.c))
        out2 = outs[2] if len(outs) == 3 else outs[0]  # the backward merge has no third output
        _launch(_merge_kernel, (triton.cdiv(self.c, block),), part, outs[0], outs[1], out2,
                self.c, self.rows, plan.rows_per_split, plan.splits, eps,
                BACKWARD=backward, BLOCK_C=block, ACC=_GL[self.acc])

    def apply(self, eps: float, stats: Normalizer, weight, bias, *, backward: bool,
              batch_stats: bool = False, activation: int = 0, sums=None, count=None):
        """The apply pass: y = act(bn(x) (+ res)), or dx (and dres) from g; sums and count:
        the three-path dx's (sum g, sum g*xhat) and the values they are over (an int, or a
        (C,) tensor)."""
        x = self.x
        per_channel = isinstance(count, torch.Tensor)
        sum_g, sum_gx = (x, x) if sums is None else (sums[0].contiguous(),
                                                    sums[1].contiguous())  # read densely
        _launch(_apply_kernel, self.grid, *(self.pointer(r) for r in _ROLES),
                stats.mean, _spread_of(stats), _or_x(weight, x), _or_x(bias, x), sum_g, sum_gx,
                count.contiguous() if per_channel else x,
                self.c, self.s, self.rows, self.plan.rows_per_split, eps,
                1 if per_channel or count is None else count,
                *self.element_strides,
                *_channel_strides(stats.mean, _spread_of(stats), weight, bias),
                **self.meta(activation, weight, bias, BACKWARD=backward,
                            BATCH_STATS=batch_stats, FROM_VAR=stats.var is not None,
                            COUNT_PER_CHANNEL=per_channel, HAS_DRES="dres" in self.tensors))


def _spread_of(stats: Normalizer) -> torch.Tensor:
    """The tensor the kernels' rstd_or_var pointer reads."""
    return stats.rstd if stats.rstd is not None else stats.var


def _channel_strides(*vectors: Optional[torch.Tensor]) -> Tuple[int, ...]:
    """The stride of each (C,) vector (0 for a missing one, which the kernel doesn't read):
    views are read in place, an expanded one through its stride 0."""
    return tuple(0 if t is None else t.stride(0) for t in vectors)


def _or_x(t: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A pointer argument the kernel's constexpr switches leave unread: any tensor will do."""
    return x if t is None else t


def forward(call: ForwardCall) -> None:
    launch = Launch(call.x, out=call.y, res=call.residual)
    if call.batch is not None:
        batch = call.batch
        launch.reduce(call.eps, (batch.mean, batch.rstd, batch.var))
        stats = Normalizer(mean=batch.mean, rstd=batch.rstd)
    else:
        stats = call.running
    if call.y is not None:
        launch.apply(call.eps, stats, call.weight, call.bias, backward=False,
                     activation=code(call.activation))


def backward(call: BackwardCall) -> None:
    act = code(call.activation)
    dx = call.dx
    if dx is None and call.dres is not None:  # the apply kernel writes dx wherever it runs
        dx = torch.empty_like(call.x)
    launch = Launch(call.x, g=call.grad_y, res=call.residual, y=call.output, out=dx,
                    dres=call.dres)
    sums, count = None, None
    if call.sums is not None or (call.through_batch_stats and call.given_sums is None):
        own = call.sums or GradSums(*(torch.empty(launch.c, dtype=launch.acc,
                                                  device=call.x.device) for _ in range(2)))
        launch.reduce(call.eps, (own.sum_g, own.sum_gx), call.stats, call.weight, call.bias,
                      act)
        sums, count = (own.sum_g, own.sum_gx), launch.rows
    if call.given_sums is not None:
        sums, count = (call.given_sums.sum_g, call.given_sums.sum_gx), call.given_count
    if dx is not None:
        launch.apply(call.eps, call.stats, call.weight, call.bias, backward=True,
                     batch_stats=call.through_batch_stats, activation=act, sums=sums,
                     count=count)
