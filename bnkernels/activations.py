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


# Activation modules that compute exactly one of ours (timm's by name: bnkernels does not
# import timm). Exact types: a subclass may change forward.
_MODULES = {torch.nn.ReLU: "relu", torch.nn.SiLU: "silu"}
_NAMED_MODULES = {"timm.layers.activations.GELU": "gelu", "timm.layers.activations.Swish": "silu"}


def of_module(module: torch.nn.Module) -> "tuple[bool, Optional[str]]":
    """(True, name) if module computes activation `name` (None: nn.Identity) exactly as the
    kernels do, else (False, None)."""
    kind = type(module)
    if kind is torch.nn.Identity:
        return True, None
    if kind is torch.nn.GELU:
        return (True, "gelu") if module.approximate == "none" else (False, None)
    name = _MODULES.get(kind) or _NAMED_MODULES.get(f"{kind.__module__}.{kind.__qualname__}")
    return (name is not None), name


def module_of(activation: Optional[str]) -> torch.nn.Module:
    """The torch module computing activation (nn.Identity for None)."""
    return {None: torch.nn.Identity, "relu": torch.nn.ReLU, "silu": torch.nn.SiLU,
            "gelu": torch.nn.GELU}[check(activation)]()
