"""The CUDA C++ backend's launcher: a ForwardCall or BackwardCall (backends/contract.py)
as one BnkCall (csrc/bnk_api.h), filled here and passed by pointer: raw pointers, (N, C, S)
sizes, each tensor's (sN, sC, sS) strides in elements (channels_last and strided views are
read in place), the block plan (plan.py), and torch's current CUDA stream. On CPU tensors
(BNKERNELS_CUDA_EMULATE=1) the emulation build runs the same kernels, for the tests.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch

from ...activations import code
from ...layout import acc_dtype, ncs_shape, ncs_strides
from ..contract import BackwardCall, ForwardCall, Normalizer, RunningUpdate, apply_update
from . import library as cuda_library
from .library import DTYPE_CODES, BnkCall
from .plan import block_plan, channel_block_plan

# The vectors whose dtype the kernels take from the call (the sums are in the acc dtype).
_DTYPE_FIELDS = {"weight": "weight_dtype", "bias": "bias_dtype", "mean": "stat_dtype"}


class Launch:
    """One BnkCall over x: shapes, plan, stream; tensors are added by role. The plan (and
    the vector width it depends on) is made once every element tensor is in: plan()."""

    def __init__(self, x: torch.Tensor, eps: float, activation: int, training: bool):
        self.device = x.device
        self.acc = acc_dtype(x.dtype)
        n, c, s = self.shape = ncs_shape(x)
        sn, sc, ss = ncs_strides(x)
        self.channels_fast = sc == 1 and c > 1
        k = self.k = BnkCall()
        k.n, k.c, k.s = n, c, s
        k.x.ptr, k.x.sn, k.x.sc, k.x.ss = x.data_ptr(), sn, sc, ss
        k.dtype = DTYPE_CODES[x.dtype]
        k.eps, k.activation, k.training = eps, activation, training
        k.count = n * s  # the values each sum of the three-path dx is over
        self.keep = [x]  # every tensor the call points into lives until it returns
        self.elements = [x]  # the element tensors, whose vectors the kernels read
        self._plan = None
        if x.device.type == "cuda":
            k.device = x.device.index if x.device.index is not None else torch.cuda.current_device()
            k.stream = torch.cuda.current_stream(x.device).cuda_stream

    def plan(self):
        """The call's BlockPlan, made (and written into the BnkCall) on first use."""
        if self._plan is None:
            n, c, s = self.shape
            vec = vector_width(self.elements, n, c, s, self.channels_fast)
            plan = None
            if vec == 1 and not self.channels_fast and channel_blocks_fit(self.elements, n, c, s):
                plan = channel_block_plan(n, c, s, self.device, 16 // self.elements[0].element_size())
            if plan is None:
                plan = block_plan(n, c, s, self.channels_fast, self.device, vec)
            self._plan = plan
            k = self.k
            k.threads, k.block_c, k.splits, k.rows_per_split, k.vec, k.layout = plan
            if plan.splits > 1:
                # forward: (K, mean, var, sum) per split and channel; backward: (sum g,
                # sum g*xhat)
                k.workspace = self._keep(torch.empty(4 * plan.splits * c, dtype=self.acc,
                                                     device=self.device))
        return self._plan

    def _keep(self, t: torch.Tensor) -> int:
        self.keep.append(t)
        return t.data_ptr()

    def tensor(self, role: str, t: Optional[torch.Tensor]) -> None:
        """An element tensor (g, res, y, out, dres), read in place through its strides."""
        if t is None:
            return
        field = getattr(self.k, role)
        field.ptr = self._keep(t)
        field.sn, field.sc, field.ss = ncs_strides(t)
        self.elements.append(t)

    def vector(self, role: str, t: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None):
        """A (C,) vector; the kernels index it densely. dtype: convert to it first."""
        if t is None:
            return
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        setattr(self.k, role, self._keep(t.contiguous()))
        if role in _DTYPE_FIELDS:
            setattr(self.k, _DTYPE_FIELDS[role], DTYPE_CODES[t.dtype])

    def statistics(self, stats: Normalizer) -> None:
        """A Normalizer: the mean, and rstd or a variance through one field."""
        self.vector("mean", stats.mean)
        given_var = stats.var is not None
        self.vector("rstd_or_var", stats.var if given_var else stats.rstd, dtype=stats.mean.dtype)
        self.k.given_var = given_var

    def running(self, update: Optional[RunningUpdate]) -> bool:
        """The running statistics, updated by the kernels (csrc/bnk_api.h); False where they
        can't (a cumulative average in one launch: the caller updates with torch ops)."""
        if update is None:
            return True
        k = self.k
        if (update.momentum is None and self.plan().splits == 1) or \
                update.var.dtype != update.mean.dtype:
            return False
        k.running_mean, k.running_var = self._keep(update.mean), self._keep(update.var)
        k.running_sm, k.running_sv = update.mean.stride(0), update.var.stride(0)
        k.running_dtype = DTYPE_CODES[update.mean.dtype]
        nbt = update.num_batches_tracked
        k.num_batches_tracked = None if nbt is None else self._keep(nbt)
        k.momentum = update.momentum or 0.0
        k.cumulative = update.momentum is None
        return True

    def rounded_sums(self, *grads: Optional[torch.Tensor]) -> None:
        """GradSums' bias_grad and weight_grad: (C,) dense, written by the kernels."""
        for i, t in enumerate(grads):
            if t is not None:
                self.k.grad_out[i] = self._keep(t)
                self.k.grad_dtype[i] = DTYPE_CODES[t.dtype]

    def outputs(self, *stats: Optional[torch.Tensor]) -> None:
        for i, t in enumerate(stats):
            self.k.stats_out[i] = None if t is None else self._keep(t)

    def run(self, entry: str) -> None:
        self.plan()
        lib = cuda_library.library(self.device)
        err = getattr(lib, entry)(ctypes.byref(self.k))
        if err:
            raise RuntimeError(f"bnkernels CUDA backend: {entry} failed: "
                               f"{lib.bnk_error_string(err).decode()}")


def vector_width(tensors, n: int, c: int, s: int, channels_fast: bool) -> int:
    """Elements per vector of the call (csrc/bnk_api.h): 16 bytes of the element type
    where every element tensor's vectors along the contiguous axis are whole and 16-byte
    aligned, else 1. channels_last: C a multiple of it, every tensor with sC == 1 and sN,
    sS multiples of it; NCHW: S a multiple of it, sS == 1 and sN, sC multiples of it (a
    stride of a dim of size 1 is never used)."""
    vec = 16 // tensors[0].element_size()
    if (c if channels_fast else s) % vec:
        return 1
    for t in tensors:
        sn, sc, ss = ncs_strides(t)
        fast, others = (sc, (sn, ss)) if channels_fast else (ss, (sn, sc))
        used = (n > 1, s > 1) if channels_fast else (n > 1, c > 1)
        if t.data_ptr() % 16 or fast != 1 or any(u and o % vec for u, o in zip(used, others)):
            return 1
    return vec


def channel_blocks_fit(tensors, n: int, c: int, s: int) -> bool:
    """Whether every element tensor holds each sample's C * S values contiguous (sC == S,
    sS == 1), with sN a multiple of a 128-bit vector and 16-byte aligned: what csrc/'s
    channel blocks (BNK_BLOCKS) read, a vector of a block's span at a time."""
    vec = 16 // tensors[0].element_size()
    for t in tensors:
        sn, sc, ss = ncs_strides(t)
        if (t.data_ptr() % 16 or (s > 1 and ss != 1) or (c > 1 and sc != s)
                or (n > 1 and sn % vec)):
            return False
    return True


def forward(call: ForwardCall) -> None:
    launch = Launch(call.x, call.eps, code(call.activation), call.batch is not None)
    launch.tensor("out", call.y)
    launch.tensor("res", call.residual)
    launch.vector("weight", call.weight)
    launch.vector("bias", call.bias)
    in_kernels = True
    if call.batch is not None:
        launch.outputs(call.batch.mean, call.batch.rstd, call.batch.var)
        in_kernels = launch.running(call.update)
    else:
        launch.statistics(call.running)
    launch.run("bnk_forward")
    if not in_kernels:
        apply_update(call.update, call.batch.mean, call.batch.var, call.x.numel() // call.x.shape[1])


def backward(call: BackwardCall) -> None:
    x = call.x
    launch = Launch(x, call.eps, code(call.activation), call.through_batch_stats)
    launch.tensor("g", call.grad_y.to(x.dtype))  # csrc/ reads every element tensor as x's dtype
    launch.tensor("res", call.residual)
    launch.tensor("y", call.output)
    launch.tensor("out", call.dx)
    launch.tensor("dres", call.dres)
    launch.vector("weight", call.weight)
    launch.vector("bias", call.bias)
    launch.statistics(call.stats)
    if call.given_sums is not None:
        launch.vector("sum_g", call.given_sums.sum_g, dtype=launch.acc)
        launch.vector("sum_gx", call.given_sums.sum_gx, dtype=launch.acc)
        launch.vector("channel_count", call.given_count, dtype=launch.acc)
    elif call.sums is not None or call.through_batch_stats:
        sums = call.sums
        if sums is None:  # the three-path dx needs them: reduced here, not returned
            sums = tuple(torch.empty(x.shape[1], dtype=launch.acc, device=x.device)
                         for _ in range(2))
        else:
            launch.rounded_sums(sums.bias_grad, sums.weight_grad)
            sums = (sums.sum_g, sums.sum_gx)
        launch.outputs(*sums)
    launch.run("bnk_backward")
