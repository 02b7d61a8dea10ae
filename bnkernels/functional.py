"""bnkernels.batch_norm: torch.nn.functional.batch_norm's signature and semantics.

Every check runs before anything is written, so a call that raises leaves the running
statistics (and num_batches_tracked, in the modules) as they were. Errors carry torch's
type and wording where torch has one.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import activations, ops  # noqa: F401  (ops registers torch.ops.bnkernels)
from .layout import ncs_shape


def check_batch_norm_args(input: Tensor, running_mean: Optional[Tensor],
                          running_var: Optional[Tensor], weight: Optional[Tensor],
                          bias: Optional[Tensor], training: bool, eps: float,
                          local_count_check: bool = True) -> None:
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    if not input.is_floating_point():
        raise NotImplementedError(f'"batch_norm" not implemented for {input.dtype}')
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    n, c, s = ncs_shape(input)
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):  # torch's order of checks
        if t is None:
            continue
        if t.numel() != c:
            raise RuntimeError(f"{name} should contain {c} elements not {t.numel()}")
        if t.device != input.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but {name} is "
                               f"on {t.device} and input is on {input.device}")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if training and local_count_check and n * s == 1:  # SyncBatchNorm counts globally
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input size {input.size()}")


def check_epilogue_args(input: Tensor, activation: Optional[str],
                        residual: Optional[Tensor]) -> None:
    """The fused epilogue's arguments: a known activation; a residual exactly like input
    (no broadcasting, no type promotion: the kernel adds it element for element)."""
    activations.check(activation)
    if residual is None:
        return
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a Tensor or None, not {type(residual).__name__}")
    if residual.shape != input.shape:
        raise RuntimeError(f"residual must have the input's shape {tuple(input.shape)}, "
                           f"got {tuple(residual.shape)}")
    if residual.dtype != input.dtype:
        raise RuntimeError(f"residual must have the input's dtype {input.dtype}, "
                           f"got {residual.dtype}")
    if residual.device != input.device:
        raise RuntimeError("Expected all tensors to be on the same device, but residual is "
                           f"on {residual.device} and input is on {input.device}")


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         count, momentum: Optional[float],
                         num_batches_tracked: Optional[Tensor]) -> None:
    """running = (1 - f) * running + f * batch, with the unbiased batch variance.

    count: the values per channel, an int, or a tensor (SyncBatchNorm's global count).
    f = momentum, or 1 / num_batches_tracked (cumulative average) when momentum is None:
    then f is computed on the device, with no host synchronisation (torch's module reads
    num_batches_tracked on the host here).
    """
    acc = mean.dtype
    if momentum is None:
        factor = num_batches_tracked.to(acc).reciprocal()
    else:
        factor = momentum
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        for buf, batch in ((running_mean, mean), (running_var, unbiased)):
            if buf.dtype == acc:
                buf.lerp_(batch, factor)
            else:  # half/bfloat16 buffers: blend in float32, round once
                buf.copy_(torch.lerp(buf.to(acc), batch, factor))


def batch_norm_impl(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                    momentum: Optional[float], eps: float,
                    num_batches_tracked: Optional[Tensor] = None,
                    activation: Optional[str] = None,
                    residual: Optional[Tensor] = None) -> Tensor:
    """batch_norm after the checks; momentum=None takes f from num_batches_tracked."""
    y, mean, _, var = torch.ops.bnkernels.batch_norm_fwd(
        input, weight, bias, running_mean, running_var, training, eps, activation, residual)
    n, _, s = ncs_shape(input)
    # An empty batch leaves the running statistics alone (as torch does).
    if training and running_mean is not None and n * s > 0:
        update_running_stats(running_mean, running_var, mean.detach(), var.detach(), n * s,
                             momentum, num_batches_tracked)
    return y


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
               activation: Optional[str] = None, residual: Optional[Tensor] = None) -> Tensor:
    """Batch Normalization over the channel dim 1 of an (N, C, *) input, like
    torch.nn.functional.batch_norm. training=True normalizes with batch statistics and, if
    running_mean/running_var are given, updates them in place with momentum.

    Fused epilogue: the result is activation(bn(input) + residual), in the same pass;
    activation "relu", "silu", "gelu" (erf form) or None, residual a tensor like input or
    None. The gradient reaches residual too."""
    if momentum is None:  # torch's op takes a float; the modules' None goes through batch_norm_impl
        raise TypeError("batch_norm(): argument 'momentum' must be float, not NoneType")
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, eps)
    check_epilogue_args(input, activation, residual)
    return batch_norm_impl(input, running_mean, running_var, weight, bias, training,
                           momentum, eps, activation=activation, residual=residual)
