"""bnkernels.convert_batchnorm: a model's BatchNorm modules on bnkernels' kernels, with or
without their epilogues fused."""
from __future__ import annotations

from torch import nn

from .fuse import fuse_batchnorm
from .replace import replace_batchnorms


def convert_batchnorm(module: nn.Module, fuse: bool = False) -> nn.Module:
    """Every nn.BatchNorm1d/2d/3d in module, at any depth, replaced by the bnkernels class
    (module itself if it is one). Parameters, buffers, training flag, device and dtype are
    kept. Children are replaced in place; the returned module is module unless module is
    itself a BatchNorm.

    fuse=True: also fuse each BN's activation (and residual add) into one BatchNormAct op
    with a torch.fx pass (fuse.py); the result is then a new fx.GraphModule sharing the
    model's Parameters and buffers, and the model itself is left unchanged."""
    if fuse:
        return fuse_batchnorm(module)
    return replace_batchnorms(module)
