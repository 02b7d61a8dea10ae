"""The two torch.library operators every bnkernels call goes through, and their autograd.

  bnkernels::batch_norm_fwd(x, weight?, bias?, running_mean?, running_var?, training, eps,
                            activation?, residual?)
      -> (y, mean, rstd, var)   y = act(bn(x) + residual); batch statistics when training
  bnkernels::batch_norm_bwd(grad_y, x, weight?, bias?, residual?, mean, stat, training, eps,
                            activation?, need_dx, need_sums, need_dres)
      -> (dx, sum g, sum g*xhat, dres)   (for relu with a residual, `residual` is y)

They are `custom_op`s with fake implementations, so torch.compile(fullgraph=True) sees one
opaque node per pass, and batching rules (register_vmap) for torch.func. Their autograd is
in autograd.py. Why custom_op and not triton_op: the backend is chosen per call below
the op (Triton, plain torch, later CUDA C++), which triton_op's tracing into the kernels
cannot express. Why the running statistics are not updated inside the op: register_autograd
accepts only functional ops, so the op returns the batch mean and variance and
functional.py updates the buffers (a C-element device op, no host sync).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backend
from .layout import acc_dtype, alloc_output


@torch.library.custom_op("bnkernels::batch_norm_fwd", mutates_args=())
def batch_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   training: bool, eps: float, activation: Optional[str],
                   residual: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return backend.select(x).forward(x, weight, bias, running_mean, running_var, training, eps,
                                     activation, residual)


@batch_norm_fwd.register_fake
def _(x, weight, bias, running_mean, running_var, training, eps, activation, residual):
    n = x.shape[1] if training else 0
    acc = acc_dtype(x.dtype)
    return (alloc_output(x), *(x.new_empty(n, dtype=acc) for _ in range(3)))


@torch.library.custom_op("bnkernels::batch_norm_bwd", mutates_args=())
def batch_norm_bwd(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   residual: Optional[Tensor], mean: Tensor, stat: Tensor, training: bool,
                   eps: float, activation: Optional[str], need_dx: bool, need_sums: bool,
                   need_dres: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return backend.select(x).backward(grad_y, x, weight, bias, residual, mean, stat, training,
                                      eps, activation, need_dx, need_sums, need_dres)


@batch_norm_bwd.register_fake
def _(grad_y, x, weight, bias, residual, mean, stat, training, eps, activation, need_dx,
      need_sums, need_dres):
    acc = acc_dtype(x.dtype)
    dx = alloc_output(x) if need_dx else x.new_empty(0, dtype=acc)
    n = x.shape[1] if need_sums else 0
    dres = alloc_output(residual) if need_dres else x.new_empty(0, dtype=acc)
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
def _(info, in_dims, grad_y, x, weight, bias, residual, mean, stat, training, eps, activation,
      need_dx, need_sums, need_dres):
    args = (grad_y, x, weight, bias, residual, mean, stat, training, eps, activation,
            need_dx, need_sums, need_dres)
    if training or need_sums or any(d is not None for d in in_dims[2:4] + in_dims[5:7]):
        return _vmap_per_sample(batch_norm_bwd, info, in_dims, args)
    return _vmap_folded(batch_norm_bwd, info, in_dims, args, folded=(0, 1, 4),
                        unfold=(0, 3) if need_dres and residual is not None else (0,))


# The pieces SyncBatchNorm composes around its collectives (no autograd of their own: its
# autograd.Function calls them).

@torch.library.custom_op("bnkernels::batch_norm_stats", mutates_args=())
def batch_norm_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(mean, biased var) per channel, in the accumulation dtype."""
    return backend.select(x).batch_stats(x)


@batch_norm_stats.register_fake
def _(x):
    acc = acc_dtype(x.dtype)
    return x.new_empty(x.shape[1], dtype=acc), x.new_empty(x.shape[1], dtype=acc)


@torch.library.custom_op("bnkernels::batch_norm_input_grad", mutates_args=())
def batch_norm_input_grad(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor,
                          var: Tensor, mean_g: Tensor, mean_gx: Tensor, eps: float) -> Tensor:
    """dx = gamma*rstd*(g - mean_g - xhat*mean_gx), rstd = 1/sqrt(var + eps)."""
    return backend.select(x).input_grad(grad_y, x, weight, mean, var, mean_g, mean_gx, eps)


@batch_norm_input_grad.register_fake
def _(grad_y, x, weight, mean, var, mean_g, mean_gx, eps):
    return alloc_output(x)
