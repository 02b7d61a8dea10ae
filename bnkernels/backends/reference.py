"""The `torch` backend: the passes as plain PyTorch, in the accumulation dtype.

It runs the tensors the kernels can't take (CPU without the interpreter, other devices),
and, on float64 inputs, it is the reference the tests hold the kernels to. Its formulas are
pure tensor functions (no in-place write), so autograd.py differentiates them for the
double backward (`backward_through_stats`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import activations
from ..layout import acc_dtype
from .contract import Backend, BackwardCall, ForwardCall, apply_update


def per_channel(v: Tensor, x: Tensor) -> Tensor:
    """A (C,) vector shaped to broadcast against x (N, C, ...)."""
    return v.view([1, -1] + [1] * (x.dim() - 2))


def reduce_dims(x: Tensor):
    return [0] + list(range(2, x.dim()))


def mean_rstd(x: Tensor, mean: Tensor, rstd: Optional[Tensor], var: Optional[Tensor],
              eps: float) -> Tuple[Tensor, Tensor]:
    """(mean, rstd) in x's accumulation dtype, from a Normalizer's fields."""
    acc = acc_dtype(x.dtype)
    if rstd is not None:
        return mean.to(acc), rstd.to(acc)
    return mean.to(acc), torch.rsqrt(var.to(acc) + eps)


def batch_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(mean, biased var) per channel of a non-empty x."""
    var, mean = torch.var_mean(x.to(acc_dtype(x.dtype)), dim=reduce_dims(x), correction=0)
    return mean, var


def _scale(weight, rstd):
    return rstd if weight is None else rstd * weight.to(rstd.dtype)


def pre_activation(x, mean, rstd, weight, bias, residual):
    """z = (x - mean) * gamma * rstd + beta (+ residual), in the accumulation dtype; where
    gamma * rstd is not finite, torch's x * scale + (beta - mean * scale), for torch's
    pattern of NaN and inf (as the kernels)."""
    scale = _scale(weight, rstd)
    shift = torch.zeros_like(scale) if bias is None else bias.to(rstd.dtype)
    finite = scale.isfinite()
    shift = torch.where(finite, shift, shift - mean * scale)
    mean = torch.where(finite, mean, torch.zeros_like(mean))
    z = (x.to(rstd.dtype) - per_channel(mean, x)) * per_channel(scale, x)
    z = z + per_channel(shift, x)
    if residual is not None:
        z = z + residual.to(rstd.dtype)
    return z


def _forward_stats(x, running_mean, running_var, training, eps):
    """(mean, rstd, var): x's batch statistics in training (var biased), the running mean
    and 1/sqrt(running_var + eps) in eval (var None)."""
    if training:
        mean, var = batch_stats(x)
        return mean, torch.rsqrt(var + eps), var
    return (*mean_rstd(x, running_mean, None, running_var, eps), None)


def forward(x, weight, bias, running_mean, running_var, training, eps, activation=None,
            residual=None):
    """(y, mean, rstd, var) of ops.batch_norm_fwd as pure tensor math (the statistics are
    empty in eval); y in the accumulation dtype."""
    mean, rstd, var = _forward_stats(x, running_mean, running_var, training, eps)
    stats = (mean, rstd, var) if training else tuple(x.new_empty(0, dtype=rstd.dtype)
                                                      for _ in range(3))
    z = pre_activation(x, mean, rstd, weight, bias, residual)
    return (activations.apply(z, activation), *stats)


def grads(grad_y, x, weight, bias, residual, output, mean, rstd, activation,
          through_batch_stats, given_sums=None, given_count=None):
    """(dx, sum g, sum g*xhat, dres) of BackwardCall, as pure tensor math from (mean, rstd),
    so it is differentiable in every argument. dres is g = dL/dz."""
    acc = rstd.dtype
    g = grad_y.to(acc)
    if activation == "relu" and output is not None:
        g = torch.where(output > 0, g, torch.zeros_like(g))
    elif activation is not None:
        g = activations.grad(g, pre_activation(x, mean, rstd, weight, bias, residual),
                             activation)
    xhat = (x.to(acc) - per_channel(mean, x)) * per_channel(rstd, x)
    dims = reduce_dims(x)
    sum_g = g.sum(dim=dims)
    sum_gx = (g * xhat).sum(dim=dims)
    dz = g
    if through_batch_stats:
        if given_sums is None:
            count = max(x.numel() // max(x.shape[1], 1), 1)
            mean_g, mean_gx = sum_g / count, sum_gx / count
        else:
            mean_g = given_sums[0].to(acc) / given_count.to(acc)
            mean_gx = given_sums[1].to(acc) / given_count.to(acc)
        g = g - per_channel(mean_g, x) - xhat * per_channel(mean_gx, x)
    dx = g * per_channel(_scale(weight, rstd), x)
    return dx, sum_g, sum_gx, dz


def backward_through_stats(grad_y, x, weight, bias, residual, output, mean, rstd, var, eps,
                           activation, need_dx, need_sums, need_dres):
    """ops.batch_norm_bwd as a function of its inputs: with rstd given (training) the
    statistics are recomputed from x, so that their dependence on x is differentiated too;
    with var given (eval) they are the constants (mean, var). Its vjp is the double
    backward (autograd.py). Results not asked for are empty, as the op's.

    Each input is cast to the accumulation dtype once, here: a half input used in several
    terms then has its gradient summed over them in float32 and rounded once, where a cast
    per use would sum half-precision parts (a constant channel's second derivative, of
    size 1/eps, overflowed float16 in parts that cancel)."""
    out_dtype = x.dtype
    acc = acc_dtype(x.dtype)
    grad_y, x, weight, bias, residual = (None if t is None else t.to(acc)
                                         for t in (grad_y, x, weight, bias, residual))
    training = rstd is not None
    if training:
        mean, var = batch_stats(x)
    mean, rstd = mean_rstd(x, mean, None, var, eps)
    dx, sum_g, sum_gx, dres = grads(grad_y, x, weight, bias, residual, output, mean, rstd,
                                    activation, training)
    empty = x.new_empty(0, dtype=rstd.dtype)
    return (dx.to(out_dtype) if need_dx else empty, sum_g if need_sums else empty,
            sum_gx if need_sums else empty, dres.to(out_dtype) if need_dres else empty)


class TorchBackend(Backend):
    name = "torch"

    def forward(self, call: ForwardCall) -> None:
        x, running, batch = call.x, call.running, call.batch
        mean, rstd, var = _forward_stats(x, running and running.mean, running and running.var,
                                         batch is not None, call.eps)
        if batch is not None:
            for out, value in zip((batch.mean, batch.rstd, batch.var), (mean, rstd, var)):
                out.copy_(value)
            if call.update is not None:
                apply_update(call.update, mean, var, x.numel() // x.shape[1])
        if call.y is not None:
            z = pre_activation(x, mean, rstd, call.weight, call.bias, call.residual)
            call.y.copy_(activations.apply(z, call.activation))

    def backward(self, call: BackwardCall) -> None:
        s = call.stats
        mean, rstd = mean_rstd(call.x, s.mean, s.rstd, s.var, call.eps)
        given = None if call.given_sums is None else (call.given_sums.sum_g,
                                                       call.given_sums.sum_gx)
        dx, sum_g, sum_gx, dres = grads(call.grad_y, call.x, call.weight, call.bias,
                                        call.residual, call.output, mean, rstd,
                                        call.activation, call.through_batch_stats, given,
                                        call.given_count)
        for out, value in ((call.dx, dx), (call.dres, dres)):
            if out is not None:
                out.copy_(value)
        sums = call.sums
        if sums is not None:
            for out, value in ((sums.sum_g, sum_g), (sums.sum_gx, sum_gx),
                               (sums.bias_grad, sum_g), (sums.weight_grad, sum_gx)):
                if out is not None:
                    out.copy_(value)


BACKEND = TorchBackend()
