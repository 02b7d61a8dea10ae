"""The activations a fused BatchNorm epilogue can apply: names, kernel codes, torch forms.

    "relu"   max(z, 0)                     (NaN stays NaN, as torch.relu)
    "silu"   z * sigmoid(z)
    "gelu"   z * Phi(z), the exact erf form (nn.GELU(approximate="none"))
    None     identity

The kernels take a code: IDENTITY, RELU, SILU, GELU below, the index in ACTIVATIONS. The
Triton kernels read these constants; csrc/bnk_api.h spells them BNK_ACT_*, and the CUDA
backend checks its library against them when it loads it (bnk_activation_name). The torch
backend and the tests use the torch forms below. Backward never stores z = bn(x)
(+ residual): it is recomputed from x, and d act/dz taken at it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

ACTIVATIONS = (None, "relu", "silu", "gelu")
IDENTITY, RELU, SILU, GELU = range(len(ACTIVATIONS))


def check(activation: Optional[str]) -> Optional[str]:
    if activation not in ACTIVATIONS:
        choices = ", ".join(repr(a) for a in ACTIVATIONS)
        raise ValueError(f"activation must be one of {choices}, got {activation!r}")
    return activation


def code(activation: Optional[str]) -> int:
    return ACTIVATIONS.index(check(activation))


def apply(z: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(z)
    if activation == "silu":
        return torch.nn.functional.silu(z)
    if activation == "gelu":
        return torch.nn.functional.gelu(z)
    return z


def grad(g: torch.Tensor, z: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    """dL/dz from g = dL/dact(z)."""
    if activation == "relu":
        return torch.where(z > 0, g, torch.zeros_like(g))
    if activation == "silu":
        s = torch.sigmoid(z)
        return g * (s * (1 + z * (1 - s)))
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(z * math.sqrt(0.5)))
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        return g * (cdf + z * pdf)
    return g
