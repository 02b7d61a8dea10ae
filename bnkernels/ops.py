"""The torch.library operators every bnkernels call goes through, and the set-up every
backend shares: the one place between autograd and the backends (docs/architecture.md).

  bnkernels::batch_norm_fwd(x, weight?, bias?, running_mean?, running_var?, training, eps,
                            activation?, residual?)
      -> (y, mean, rstd, var)   y = act(bn(x) + residual); the batch statistics when
                                training (empty otherwise)
  bnkernels::batch_norm_bwd(grad_y, x, weight?, bias?, residual?, output?, mean, rstd?, var?,
                            eps, activation?, need_dx, need_sums, need_dres)
      -> (dx, sum g, sum g*xhat, dres)
         mean with rstd: the forward's batch statistics (training: the three-path dx);
         mean with var: constant statistics (eval: the running ones). residual: to recompute
         z for silu/gelu; output: the forward's y, for relu after a residual (its mask)
  bnkernels::batch_norm_stats(x) -> (mean, var)
  bnkernels::batch_norm_input_grad(grad_y, x, weight?, mean, var, sum_g, sum_gx, count, eps)
      -> dx through statistics and sums made elsewhere (SyncBatchNorm's global ones)

Each op's body (run_*) does what no backend repeats (backends/contract.py lists it):
allocates the outputs in torch's layout, answers an empty batch itself, makes the inputs
kernel-readable, fills a call record, and hands it to backends.select(x).

They are `custom_op`s with fake implementations, so torch.compile(fullgraph=True) sees one
opaque node per pass, and batching rules (register_vmap) for torch.func. Their autograd is
in autograd.py. Why custom_op and not triton_op: the backend is chosen per call below
the op (Triton, CUDA C++, plain torch), which triton_op's tracing into the kernels cannot
express. Why the ops don't update the running statistics: register_autograd accepts only
functional ops, so the op returns the batch mean and variance and autograd.py updates the
buffers with torch ops after it (C-element device ops, no host sync). Eager calls on plain
tensors run the bodies below directly (autograd.direct(), docs/architecture.md), and there
run_forward's `update` has the kernels update them in the launches they already make.
"""
from __future__ import annotations

import threading
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .backends.contract import (BackwardCall, BatchStats, ForwardCall, GradSums, Normalizer,
                                RunningUpdate, apply_update)
from .layout import acc_dtype, alloc_output, kernel_ready


class _CallLog(threading.local):
    """The calls run_forward and run_backward hand a backend while a caller listens
    (eager.py records a call's replayer from them): a list of (backend, call), or None."""
    calls: Optional[list] = None


call_log = _CallLog()


def _run(call, forward: bool, x: Tensor) -> None:
    backend = backends.select(x)
    (backend.forward if forward else backend.backward)(call)
    calls = call_log.calls
    if calls is not None:
        calls.append((backend, call))


def _acc_vectors(x: Tensor, length: int, count: int) -> Tuple[Tensor, ...]:
    """count per-channel results of x's accumulation dtype, each its own tensor (a custom
    op's outputs may not alias each other)."""
    dtype = acc_dtype(x.dtype)
    return tuple(_per_channel(x, length, dtype) for _ in range(count))


def _per_channel(x: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    """A per-channel result: zeros for an empty batch, which no kernel reduces."""
    return (x.new_zeros if x.numel() == 0 else x.new_empty)(length, dtype=dtype)


def _dres_like(activation, residual, output) -> Optional[Tensor]:
    """The tensor the residual's gradient dL/dz is shaped like, where the backward op makes
    one: only with an activation (without one, dL/dresidual is grad_y itself)."""
    if activation is None:
        return None
    return residual if residual is not None else output


def run_forward(x, weight, bias, running_mean, running_var, training, eps, activation,
                residual, update: Optional[RunningUpdate] = None, statistics: bool = True):
    """batch_norm_fwd's body; update (training, the eager route of autograd.py only: the op
    itself is functional) has the backend update the running statistics in place.
    statistics False (eval only; autograd.py's inference route): no empty statistics
    outputs are made, they are None."""
    y = alloc_output(x)
    stats = BatchStats(*_acc_vectors(x, x.shape[1] if training else 0, 3)) \
        if training or statistics else BatchStats(None, None, None)
    if x.numel() > 0:
        call = ForwardCall(x=kernel_ready(x), weight=weight, bias=bias, eps=eps,
                           activation=activation,
                           residual=None if residual is None else kernel_ready(residual), y=y,
                           running=None if training else Normalizer(running_mean,
                                                                    var=running_var),
                           batch=stats if training else None, update=update)
        _run(call, True, x)
    elif update is not None:
        apply_update(update, None, None, 0)  # an empty batch counts, but moves no statistic
    if update is not None:  # written by kernels: autograd's version counters must move
        torch.autograd.graph.increment_version(
            [t for t in (update.mean, update.var, update.num_batches_tracked) if t is not None])
    return y, stats.mean, stats.rstd, stats.var


def run_backward(grad_y, x, weight, bias, residual, output, mean, rstd, var, eps, activation,
                 need_dx, need_sums, need_dres, placeholders: bool = True,
                 sum_dtypes: Tuple[Optional[torch.dtype], Optional[torch.dtype]] = (None, None)):
    """batch_norm_bwd's body. placeholders False (autograd.py's direct route): an output
    not asked for is None, not an empty tensor (the op must return tensors). sum_dtypes
    (the direct route's too): the dtypes to return sum g and sum g*xhat in, None for the
    accumulation dtype (the bias's and the weight's, so that their gradients need no cast:
    contract.GradSums)."""
    if activation is None:  # bias, residual and output only serve to recompute z
        bias = residual = output = None
    dres_like = _dres_like(activation, residual, output)
    need_dres = need_dres and dres_like is not None
    unwanted = (lambda: _acc_vectors(x, 0, 1)[0]) if placeholders else (lambda: None)
    dx = alloc_output(x) if need_dx else unwanted()
    dres = alloc_output(dres_like) if need_dres else unwanted()
    sum_g, sum_gx = _acc_vectors(x, x.shape[1], 2) if need_sums else \
        (unwanted(), unwanted())
    rounded = (None, None)  # GradSums' bias_grad and weight_grad
    if need_sums and sum_dtypes != (None, None):
        rounded = tuple(None if dtype is None or dtype == sum_g.dtype else
                        _per_channel(x, x.shape[1], dtype) for dtype in sum_dtypes)
    if x.numel() > 0 and (need_dx or need_dres or need_sums):
        call = BackwardCall(
            grad_y=kernel_ready(grad_y), x=kernel_ready(x), weight=weight, bias=bias, eps=eps,
            activation=activation, residual=None if residual is None else kernel_ready(residual),
            output=None if output is None else kernel_ready(output),
            stats=Normalizer(mean, rstd=rstd, var=var),
            through_batch_stats=rstd is not None, dx=dx if need_dx else None,
            dres=dres if need_dres else None,
            sums=GradSums(sum_g, sum_gx, *rounded) if need_sums else None)
        _run(call, False, x)
    return (dx, sum_g if rounded[0] is None else rounded[0],
            sum_gx if rounded[1] is None else rounded[1], dres)


@torch.library.custom_op("bnkernels::batch_norm_fwd", mutates_args=())
def batch_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   training: bool, eps: float, activation: Optional[str],
                   residual: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return run_forward(x, weight, bias, running_mean, running_var, training, eps, activation,
                       residual)


@batch_norm_fwd.register_fake
def _(x, weight, bias, running_mean, running_var, training, eps, activation, residual):
    n = x.shape[1] if training else 0
    acc = acc_dtype(x.dtype)
    return (alloc_output(x), *(x.new_empty(n, dtype=acc) for _ in range(3)))


@torch.library.custom_op("bnkernels::batch_norm_bwd", mutates_args=())
def batch_norm_bwd(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   residual: Optional[Tensor], output: Optional[Tensor], mean: Tensor,
                   rstd: Optional[Tensor], var: Optional[Tensor], eps: float,
                   activation: Optional[str], need_dx: bool, need_sums: bool,
                   need_dres: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return run_backward(grad_y, x, weight, bias, residual, output, mean, rstd, var, eps,
                        activation, need_dx, need_sums, need_dres)


@batch_norm_bwd.register_fake
def _(grad_y, x, weight, bias, residual, output, mean, rstd, var, eps, activation, need_dx,
      need_sums, need_dres):
    acc = acc_dtype(x.dtype)
    dres_like = _dres_like(activation, residual, output)
    dx = alloc_output(x) if need_dx else x.new_empty(0, dtype=acc)
    n = x.shape[1] if need_sums else 0
    dres = alloc_output(dres_like) if need_dres and dres_like is not None else \
        x.new_empty(0, dtype=acc)
    return dx, x.new_empty(n, dtype=acc), x.new_empty(n, dtype=acc), dres


# vmap (torch.func.vmap, and the vmap torch.func.jacrev/jacfwd and the autograd.Functions'
# generated rules run): an eval-mode call whose per-channel tensors are not batched is one
# call over the batch folded into N (each sample is normalized by the same statistics);
# anything else (training: statistics per sample; batched weights) is one call per sample.

def _fold_batch(t: Tensor, dim: int) -> Tensor:
    t = t.movedim(dim, 0)
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _vmap_per_sample(op, info, in_dims, args):
    outs = [op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)))
            for i in range(info.batch_size)]
    return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])


def _vmap_folded(op, info, in_dims, args, folded, unfold):
    """One call with the element tensors at `folded` (their batch dim merged into N); the
    outputs at `unfold` get the batch dim back, the others (per-channel) are unbatched."""
    args = list(args)
    for i in folded:
        if args[i] is not None:
            args[i] = _fold_batch(args[i], in_dims[i]) if in_dims[i] is not None else \
                args[i].repeat(info.batch_size, *([1] * (args[i].dim() - 1)))
    outs = op(*args)
    b = info.batch_size
    return (tuple(o.reshape(b, o.shape[0] // b, *o.shape[1:]) if i in unfold else o
                  for i, o in enumerate(outs)),
            tuple(0 if i in unfold else None for i in range(len(outs))))


@torch.library.register_vmap("bnkernels::batch_norm_fwd")
def _(info, in_dims, x, weight, bias, running_mean, running_var, training, eps, activation,
      residual):
    args = (x, weight, bias, running_mean, running_var, training, eps, activation, residual)
    if training or any(d is not None for d in in_dims[1:5]):
        return _vmap_per_sample(batch_norm_fwd, info, in_dims, args)
    return _vmap_folded(batch_norm_fwd, info, in_dims, args, folded=(0, 8), unfold=(0,))


@torch.library.register_vmap("bnkernels::batch_norm_bwd")
def _(info, in_dims, grad_y, x, weight, bias, residual, output, mean, rstd, var, eps,
      activation, need_dx, need_sums, need_dres):
    args = (grad_y, x, weight, bias, residual, output, mean, rstd, var, eps, activation,
            need_dx, need_sums, need_dres)
    if rstd is not None or need_sums or any(d is not None for d in in_dims[2:4] + in_dims[6:9]):
        return _vmap_per_sample(batch_norm_bwd, info, in_dims, args)
    makes_dres = need_dres and _dres_like(activation, residual, output) is not None
    return _vmap_folded(batch_norm_bwd, info, in_dims, args, folded=(0, 1, 4, 5),
                        unfold=(0, 3) if makes_dres else (0,))


# The pieces SyncBatchNorm composes around its collectives (no autograd of their own: its
# autograd.Function calls them).

@torch.library.custom_op("bnkernels::batch_norm_stats", mutates_args=())
def batch_norm_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(mean, biased var) per channel, in the accumulation dtype (zeros for an empty x)."""
    mean, rstd, var = _acc_vectors(x, x.shape[1], 3)
    if x.numel() > 0:  # eps: any positive value; the rstd it gives goes unused
        call = ForwardCall(x=kernel_ready(x), weight=None, bias=None, eps=1.0, activation=None,
                           residual=None, y=None, batch=BatchStats(mean, rstd, var))
        backends.select(x).forward(call)
    return mean, var


@batch_norm_stats.register_fake
def _(x):
    acc = acc_dtype(x.dtype)
    return x.new_empty(x.shape[1], dtype=acc), x.new_empty(x.shape[1], dtype=acc)


@torch.library.custom_op("bnkernels::batch_norm_input_grad", mutates_args=())
def batch_norm_input_grad(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor,
                          var: Tensor, sum_g: Tensor, sum_gx: Tensor, count: Tensor,
                          eps: float) -> Tensor:
    """dx = gamma*rstd*(g - sum_g/count - xhat*sum_gx/count), rstd = 1/sqrt(var + eps): the
    three-path input gradient through statistics and sums over count values made elsewhere
    (count: (C,), in the accumulation dtype)."""
    dx = alloc_output(x)
    if x.numel() > 0:
        call = BackwardCall(
            grad_y=kernel_ready(grad_y), x=kernel_ready(x), weight=weight, bias=None, eps=eps,
            activation=None, residual=None, output=None, stats=Normalizer(mean, var=var),
            through_batch_stats=True, dx=dx, given_sums=GradSums(sum_g, sum_gx),
            given_count=count)
        backends.select(x).backward(call)
    return dx


@batch_norm_input_grad.register_fake
def _(grad_y, x, weight, mean, var, sum_g, sum_gx, count, eps):
    return alloc_output(x)
