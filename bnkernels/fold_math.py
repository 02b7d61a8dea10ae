"""Folding an eval-mode BatchNorm into the linear map before it: pure tensor math.

For a layer y = W * x + b followed by BN with running statistics (mu, var), gamma, beta:

    a  = gamma / sqrt(var + eps)              per output channel
    W' = W * a                                scaled along the output-channel axis
    b' = (b - mu) * a + beta                  (b = 0 when the layer has no bias)

The output-channel axis is dim 0 of Conv{1,2,3}d and Linear weights (C_out, C_in/groups, k...).
ConvTranspose{1,2,3}d weights are (C_in, C_out/groups, k...): viewed as
(groups, C_in/groups, C_out/groups, k...), they are scaled along the third axis.
Everything is computed in float32 (float64 for float64 layers) and cast back once.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fold_bn_into_weights(weight: Tensor, bias: Optional[Tensor], running_mean: Tensor,
                         running_var: Tensor, eps: float, gamma: Optional[Tensor] = None,
                         beta: Optional[Tensor] = None, transposed: bool = False,
                         groups: int = 1) -> Tuple[Tensor, Tensor]:
    """(W', b') in the layer's dtypes. gamma/beta None: an affine=False BN (1 and 0)."""
    ct = _compute_dtype(weight.dtype)
    a = torch.rsqrt(running_var.to(ct) + eps)
    if gamma is not None:
        a = a * gamma.to(ct)
    w = weight.to(ct)
    if transposed:
        c_in, c_out_per_group = w.shape[0], w.shape[1]
        kernel = w.shape[2:]
        scale = a.view(groups, 1, c_out_per_group, *([1] * len(kernel)))
        w_folded = (w.view(groups, c_in // groups, c_out_per_group, *kernel) * scale).view(w.shape)
    else:
        w_folded = w * a.view(-1, *([1] * (w.dim() - 1)))
    b = torch.zeros_like(a) if bias is None else bias.to(ct)
    b_folded = (b - running_mean.to(ct)) * a
    if beta is not None:
        b_folded = b_folded + beta.to(ct)
    bias_dtype = weight.dtype if bias is None else bias.dtype
    return w_folded.to(weight.dtype), b_folded.to(bias_dtype)
