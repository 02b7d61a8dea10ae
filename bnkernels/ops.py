"""The two torch.library operators every bnkernels call goes through, and their autograd.

  bnkernels::batch_norm_fwd(x, weight?, bias?, running_mean?, running_var?, training, eps,
                            activation?, residual?)
      -> (y, mean, rstd, var)   y = act(bn(x) + residual); batch statistics when training
  bnkernels::batch_norm_bwd(grad_y, x, weight?, bias?, residual?, mean, stat, training, eps,
                            activation?, need_dx, need_sums, need_dres)
      -> (dx, sum g, sum g*xhat, dres)   (for relu with a residual, `residual` is y)

They are `custom_op`s with fake implementations, so torch.compile(fullgraph=True) sees one
opaque node per pass. Why custom_op and not triton_op: the backend is chosen per call below
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


def _setup_context(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, training, eps, activation, residual = inputs
    _, mean, rstd, var = output
    ctx.mark_non_differentiable(mean, rstd, var)  # statistics for the buffers, not the loss
    # Training saves the float32 (float64) batch mean/rstd; eval the running statistics,
    # from which backward recomputes rstd. xhat is never saved: backward recomputes it,
    # and with an activation z = bn(x) + residual too (bias and residual are saved for that).
    stats = (mean, rstd) if training else (running_mean, running_var)
    fused = activation is not None
    if activation == "relu" and residual is not None:
        # relu' = (y > 0): keep y, which torch's relu keeps too, not the residual, which an
        # unfused add would let go (a downsample branch's output).
        residual = output[0]
    ctx.save_for_backward(x, weight, bias if fused else None, residual if fused else None,
                          *stats)
    ctx.training, ctx.eps, ctx.activation = training, eps, activation
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_y, _grad_mean, _grad_rstd, _grad_var):
    x, weight, bias, residual, mean, stat = ctx.saved_tensors
    need_dx, need_dweight, need_dbias = ctx.needs_input_grad[:3]
    need_dres = ctx.needs_input_grad[8]
    fused_dres = need_dres and ctx.activation is not None
    dx, sum_g, sum_gx, dres = torch.ops.bnkernels.batch_norm_bwd(
        grad_y, x, weight, bias, residual, mean, stat, ctx.training, ctx.eps, ctx.activation,
        need_dx, need_dweight or need_dbias, fused_dres)
    if need_dres and not fused_dres:
        dres = grad_y  # z = bn(x) + residual with no activation: dL/dresidual = dL/dy
    return (dx if need_dx else None,
            sum_gx.to(weight.dtype) if need_dweight else None,
            sum_g.to(ctx.bias_dtype) if need_dbias else None,
            None, None, None, None, None,
            dres if need_dres else None)


batch_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


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
