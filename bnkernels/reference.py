"""Plain-PyTorch BatchNorm with the same contract as triton_batch_norm (the `torch` backend).

It is the path for tensors the Triton kernels can't take (CPU without the interpreter,
other devices), and, run on float64 inputs, the reference the tests hold the kernels to.
It states the math of ../shared/BN_MATH.md directly, in the accumulation dtype.
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
    acc = acc_dtype(x.dtype)
    mean, rstd = _mean_rstd(x, mean, stat, training, eps)
    g = grad_out.to(acc)
    empty = torch.empty(0, dtype=acc, device=x.device)
    dres = empty.clone()
    if activation == "relu" and residual is not None:  # residual holds y: relu' = y > 0
        g = torch.where(residual > 0, g, torch.zeros_like(g))
    elif activation is not None:
        g = activations.grad(g, _pre_activation(x, mean, rstd, weight, bias, residual),
                             activation)
    if need_dres and activation is not None and residual is not None:
        dres = alloc_output(residual)
        dres.copy_(g)
    xhat = (x.to(acc) - _per_channel(mean, x)) * _per_channel(rstd, x)
    dims = _reduce_dims(x)
    sum_g = g.sum(dim=dims)
    sum_gx = (g * xhat).sum(dim=dims)
    dx = empty.clone()  # (outputs of a custom op may not alias each other)
    if need_dx and training:
        m = max(x.numel() // max(x.shape[1], 1), 1)
        dx = _three_path_dx(g, x, xhat, weight, rstd, sum_g / m, sum_gx / m)
    elif need_dx:
        dx = alloc_output(x)
        dx.copy_(g * _per_channel(_scale(weight, rstd), x))
    if not need_sums:
        return dx, empty, empty.clone(), dres
    return dx, sum_g, sum_gx, dres


def _pre_activation(x, mean, rstd, weight, bias, residual):
    """z = (x - mean) * gamma * rstd + beta (+ residual), in the accumulation dtype."""
    z = (x.to(rstd.dtype) - _per_channel(mean, x)) * _per_channel(_scale(weight, rstd), x)
    if bias is not None:
        z = z + _per_channel(bias.to(rstd.dtype), x)
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
