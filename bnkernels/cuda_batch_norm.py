"""The CUDA C++ backend (BNKERNELS_BACKEND=cuda): launchers for csrc/'s kernels with the
contract of triton_batch_norm (forward, backward, batch_stats, input_grad), so that
ops.py's one custom op and autograd formula serve both.

A call is one BnkCall (csrc/bnk_api.h) filled here and passed by pointer: raw pointers,
(N, C, S) sizes, each tensor's (sN, sC, sS) strides in elements (channels_last and strided
views are read in place), the block plan (layout.block_plan), and torch's current CUDA
stream. On CPU tensors (BNKERNELS_CUDA_EMULATE=1) the emulation build runs the same
kernels, for the tests.
"""
from __future__ import annotations

import ctypes
from typing import Optional, Tuple

import torch

from . import cuda_library
from .activations import code
from .cuda_library import DTYPE_CODES, BnkCall
from .layout import acc_dtype, alloc_output, block_plan, kernel_ready, ncs_shape, ncs_strides


def launch_counts():
    """Kernel launches so far, by kernel (the tests read it to prove the kernels ran)."""
    return cuda_library.launch_counts()


# The vectors whose dtype the kernels take from the call (the sums are in the acc dtype).
_DTYPE_FIELDS = {"weight": "weight_dtype", "bias": "bias_dtype", "mean": "stat_dtype"}


class _Call:
    """One BnkCall over x: shapes, plan, stream; tensors are added by role."""

    def __init__(self, x: torch.Tensor, eps: float, activation: int, training: bool):
        self.device = x.device
        self.acc = acc_dtype(x.dtype)
        n, c, s = ncs_shape(x)
        sn, sc, ss = ncs_strides(x)
        channels_fast = sc == 1 and c > 1
        plan = block_plan(n, c, s, channels_fast, x.device)
        k = self.k = BnkCall()
        k.n, k.c, k.s = n, c, s
        k.x.ptr, k.x.sn, k.x.sc, k.x.ss = x.data_ptr(), sn, sc, ss
        k.dtype = DTYPE_CODES[x.dtype]
        k.eps, k.activation, k.training = eps, activation, training
        k.sum_count = n * s  # the count of the sums in the three-path dx (input_grad: 1)
        k.channels_fast = channels_fast
        k.threads, k.block_c, k.splits, k.rows_per_split = plan
        self.keep = [x]  # every tensor the call points into lives until it returns
        if plan.splits > 1:
            # forward: (K, mean, var, sum) per split and channel; backward: (sum g, sum g*xhat)
            k.workspace = self._keep(torch.empty(4 * plan.splits * c, dtype=self.acc,
                                                 device=x.device))
        if x.device.type == "cuda":
            k.device = x.device.index if x.device.index is not None else torch.cuda.current_device()
            k.stream = torch.cuda.current_stream(x.device).cuda_stream

    def _keep(self, t: torch.Tensor) -> int:
        self.keep.append(t)
        return t.data_ptr()

    def tensor(self, role: str, t: Optional[torch.Tensor]) -> None:
        """An element tensor (g, res, out, dres), read in place through its strides."""
        if t is None:
            return
        field = getattr(self.k, role)
        field.ptr = self._keep(t)
        field.sn, field.sc, field.ss = ncs_strides(t)

    def vector(self, role: str, t: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None):
        """A (C,) vector; the kernels index it densely. dtype: convert to it first."""
        if t is None:
            return
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        setattr(self.k, role, self._keep(t.contiguous()))
        if role in _DTYPE_FIELDS:
            setattr(self.k, _DTYPE_FIELDS[role], DTYPE_CODES[t.dtype])

    def statistics(self, mean: torch.Tensor, stat: torch.Tensor, from_running: bool) -> None:
        self.vector("mean", mean)
        self.vector("stat", stat, dtype=mean.dtype)
        self.k.from_running = from_running

    def outputs(self, *stats: Optional[torch.Tensor]) -> None:
        for i, t in enumerate(stats):
            self.k.stats_out[i] = None if t is None else self._keep(t)

    def run(self, entry: str) -> None:
        lib = cuda_library.library(self.device)
        err = getattr(lib, entry)(ctypes.byref(self.k))
        if err:
            raise RuntimeError(f"bnkernels CUDA backend: {entry} failed: "
                               f"{lib.bnk_error_string(err).decode()}")


def _new_stats(x: torch.Tensor, length: int, count: int) -> Tuple[torch.Tensor, ...]:
    """count per-channel results of the accumulation dtype; zeros for an empty batch, where
    no kernel runs to write them."""
    alloc = torch.zeros if x.numel() == 0 else torch.empty
    return tuple(alloc(length, dtype=acc_dtype(x.dtype), device=x.device) for _ in range(count))


def forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
            training: bool, eps: float, activation: Optional[str] = None,
            residual: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
    """(y, mean, rstd, biased var), y = act(bn(x) + residual); the statistics are empty in
    eval mode."""
    y = alloc_output(x)
    stats = _new_stats(x, x.shape[1] if training else 0, 3)
    if x.numel() == 0:
        return (y, *stats)
    x, residual = kernel_ready(x), kernel_ready(residual)
    call = _Call(x, eps, code(activation), training)
    call.tensor("out", y)
    call.tensor("res", residual)
    call.vector("weight", weight)
    call.vector("bias", bias)
    if training:
        call.outputs(*stats)
    else:
        call.statistics(running_mean, running_var, from_running=True)
    call.run("bnk_forward")
    return (y, *stats)


def backward(grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
             bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
             mean: torch.Tensor, stat: torch.Tensor, training: bool, eps: float,
             activation: Optional[str], need_dx: bool, need_sums: bool,
             need_dres: bool) -> Tuple[torch.Tensor, ...]:
    """(dx, sum g, sum g*xhat, dres): triton_batch_norm.backward's contract (with relu,
    `residual` is the forward's output y)."""
    acc = acc_dtype(x.dtype)
    act = code(activation)
    if act == 0:
        bias = residual = None
    need_dres = need_dres and residual is not None
    empty = torch.empty(0, dtype=acc, device=x.device)
    dx = alloc_output(x) if need_dx else empty
    dres = alloc_output(residual) if need_dres else empty.clone()
    reduce = training or need_sums
    sums = _new_stats(x, x.shape[1] if reduce else 0, 2)
    if x.numel() > 0 and (need_dx or need_dres or need_sums):
        x, residual = kernel_ready(x), kernel_ready(residual)
        grad_out = kernel_ready(grad_out.to(x.dtype))
        call = _Call(x, eps, act, training)
        call.tensor("g", grad_out)
        call.tensor("res", residual)
        call.tensor("out", dx if need_dx else None)
        call.tensor("dres", dres if need_dres else None)
        call.vector("weight", weight)
        call.vector("bias", bias)
        call.statistics(mean, stat, from_running=not training)
        if reduce:
            call.outputs(*sums)
        call.run("bnk_backward")
    # (a custom op's outputs may not alias each other: each empty result is its own tensor)
    return (dx, sums[0] if need_sums else empty.clone(), sums[1] if need_sums else empty.clone(),
            dres)


def batch_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) per channel, in the accumulation dtype (zeros for an empty x)."""
    mean, var = _new_stats(x, x.shape[1], 2)
    if x.numel() > 0:
        x = kernel_ready(x)
        call = _Call(x, 1.0, 0, True)  # any eps > 0: its rstd goes unused
        call.outputs(mean, torch.empty_like(mean), var)
        call.run("bnk_forward")
    return mean, var


def input_grad(grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
               mean: torch.Tensor, var: torch.Tensor, mean_g: torch.Tensor,
               mean_gx: torch.Tensor, eps: float) -> torch.Tensor:
    """dx through batch statistics given from outside (SyncBatchNorm): mean/var the global
    statistics, mean_g/mean_gx the global sum(g)/m and sum(g*xhat)/m."""
    dx = alloc_output(x)
    if x.numel() == 0:
        return dx
    x = kernel_ready(x)
    call = _Call(x, eps, 0, True)
    call.tensor("g", kernel_ready(grad_out.to(x.dtype)))
    call.tensor("out", dx)
    call.vector("weight", weight)
    call.statistics(mean, var, from_running=True)
    call.vector("sum_g", mean_g, dtype=call.acc)
    call.vector("sum_gx", mean_gx, dtype=call.acc)
    call.k.sum_count = 1.0
    call.run("bnk_backward")
    return dx
