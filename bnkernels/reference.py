"""Plain-PyTorch BatchNorm with the same contract as triton_batch_norm (the `torch` backend).

It is the path for tensors the Triton kernels can't take (CPU without the interpreter,
other devices), and, run on float64 inputs, the reference the tests hold the kernels to.
It states the math directly, in the accumulation dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import activations
from .layout import acc_dtype, alloc_output


def _per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (C,) vector shaped to broadcast against x (N, C, ...)."""
    return v.view([1, -1] + [1] * (x.dim() - 2))


def _reduce_dims(x: torch.Tensor):
    return [0] + list(range(2, x.dim()))


def _mean_rstd(x, mean, stat, training, eps):
    """(mean, rstd) in the accumulation dtype, from saved batch or running statistics."""
    acc = acc_dtype(x.dtype)
    if training:
        return mean.to(acc), stat.to(acc)
    return mean.to(acc), torch.rsqrt(stat.to(acc) + eps)


def forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
            training: bool, eps: float, activation: Optional[str] = None,
            residual: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
    """(y, mean, rstd, biased var), y = act(bn(x) + residual); the statistics are empty in
    eval mode."""
    acc = acc_dtype(x.dtype)
    if training:
        mean, var = batch_stats(x)
        rstd = torch.rsqrt(var + eps)
        stats = (mean, rstd, var.clone())
    else:
        mean, rstd = _mean_rstd(x, running_mean, running_var, False, eps)
        stats = tuple(torch.empty(0, dtype=acc, device=x.device) for _ in range(3))
    y = alloc_output(x)
    y.copy_(activations.apply(_pre_activation(x, mean, rstd, weight, bias, residual), activation))
    return (y, *stats)


def backward(grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
             bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
             mean: torch.Tensor, stat: torch.Tensor, training: bool, eps: float,
             activation: Optional[str], need_dx: bool, need_sums: bool,
             need_dres: bool) -> Tuple[torch.Tensor, ...]:
    """(dx, sum g, sum g*xhat, dres), as triton_batch_norm.backward."""
    mean, rstd = _mean_rstd(x, mean, stat, training, eps)
    dx, sum_g, sum_gx, dres = grads_from_stats(grad_out, x, weight, bias, residual, mean, rstd,
                                               training, activation, need_dx, need_sums,
                                               need_dres)
    # in torch's layout, and (outputs of a custom op may not alias each other) each its own
    return (_in_layout(dx, x) if dx.numel() else dx.clone(), sum_g.clone(), sum_gx.clone(),
            _in_layout(dres, residual) if dres.numel() else dres.clone())


def _in_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = alloc_output(like)
    out.copy_(t)
    return out


def grads_from_stats(grad_out, x, weight, bias, residual, mean, rstd, training, activation,
                     need_dx, need_sums, need_dres):
    """The backward pass's (dx, sum g, sum g*xhat, dres) from the given (mean, rstd), as
    pure tensor math (no in-place write), so it is differentiable in every argument. With
    activation "relu" and a residual, `residual` is the forward's output y (relu' = y > 0).
    Results not asked for are empty."""
    acc = rstd.dtype
    g = grad_out.to(acc)
    empty = x.new_empty(0, dtype=acc)
    if activation == "relu" and residual is not None:
        g = torch.where(residual > 0, g, torch.zeros_like(g))
    elif activation is not None:
        g = activations.grad(g, _pre_activation(x, mean, rstd, weight, bias, residual),
                             activation)
    dres = empty
    if need_dres and activation is not None and residual is not None:
        dres = g.to(residual.dtype)
    xhat = (x.to(acc) - _per_channel(mean, x)) * _per_channel(rstd, x)
    dims = _reduce_dims(x)
    sum_g = g.sum(dim=dims)
    sum_gx = (g * xhat).sum(dim=dims)
    dx = empty
    if need_dx and training:
        m = max(x.numel() // max(x.shape[1], 1), 1)
        g = g - _per_channel(sum_g / m, x) - xhat * _per_channel(sum_gx / m, x)
    if need_dx:
        dx = (g * _per_channel(_scale(weight, rstd), x)).to(x.dtype)
    if not need_sums:
        sum_g = sum_gx = empty
    return dx, sum_g, sum_gx, dres


def backward_through_stats(grad_out, x, weight, bias, residual, running_mean, running_var,
                           training, eps, activation, need_dx, need_sums, need_dres):
    """grads_from_stats with the statistics a function of the inputs: recomputed from x in
    training (so their dependence on x is differentiated too), the running ones in eval.
    This is the backward pass as a function of its inputs; its derivative is the double
    backward (autograd.py)."""
    acc = acc_dtype(x.dtype)
    if training:
        var, mean = torch.var_mean(x.to(acc), dim=_reduce_dims(x), correction=0)
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    return grads_from_stats(grad_out, x, weight, bias, residual, mean, torch.rsqrt(var + eps),
                            training, activation, need_dx, need_sums, need_dres)


def _pre_activation(x, mean, rstd, weight, bias, residual):
    """z = (x - mean) * gamma * rstd + beta (+ residual), in the accumulation dtype; where
    gamma * rstd is not finite, torch's x * scale + (beta - mean * scale), for torch's
    pattern of NaN and inf (as the kernels)."""
    scale = _scale(weight, rstd)
    shift = torch.zeros_like(scale) if bias is None else bias.to(rstd.dtype)
    finite = scale.isfinite()
    shift = torch.where(finite, shift, shift - mean * scale)
    mean = torch.where(finite, mean, torch.zeros_like(mean))
    z = (x.to(rstd.dtype) - _per_channel(mean, x)) * _per_channel(scale, x)
    z = z + _per_channel(shift, x)
    if residual is not None:
        z = z + residual.to(rstd.dtype)
    return z


def batch_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) per channel, as triton_batch_norm.batch_stats."""
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:
        zeros = torch.zeros(x.shape[1], dtype=acc, device=x.device)
        return zeros, zeros.clone()
    var, mean = torch.var_mean(x.to(acc), dim=_reduce_dims(x), correction=0)
    return mean, var


def input_grad(grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
               mean: torch.Tensor, var: torch.Tensor, mean_g: torch.Tensor,
               mean_gx: torch.Tensor, eps: float) -> torch.Tensor:
    """dx through statistics given from outside, as triton_batch_norm.input_grad."""
    mean, rstd = _mean_rstd(x, mean, var, False, eps)
    xhat = (x.to(mean.dtype) - _per_channel(mean, x)) * _per_channel(rstd, x)
    return _three_path_dx(grad_out.to(rstd.dtype), x, xhat, weight, rstd, mean_g, mean_gx)


def _scale(weight, rstd):
    return rstd if weight is None else rstd * weight.to(rstd.dtype)


def _three_path_dx(g, x, xhat, weight, rstd, mean_g, mean_gx):
    """dx = gamma * rstd * (g - mean(g) - xhat * mean(g * xhat)), in x's layout."""
    dx = alloc_output(x)
    g = g - _per_channel(mean_g, x) - xhat * _per_channel(mean_gx, x)
    dx.copy_(g * _per_channel(_scale(weight, rstd), x))
    return dx
