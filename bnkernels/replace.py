"""Swapping torch's BatchNorm modules for bnkernels' in place, like
nn.SyncBatchNorm.convert_sync_batchnorm: what convert_batchnorm does without fusion (and
what the fusion pass, the fold and SyncBatchNorm build on). The new modules take over the
very same Parameter and buffer objects, so optimizers and state_dicts keep working."""
from __future__ import annotations

from torch import nn

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

# Exact classes only: a user's subclass may have its own forward, which must not be lost.
_REPLACEMENTS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d,
                 nn.BatchNorm3d: BatchNorm3d}


def converted(bn: nn.modules.batchnorm._BatchNorm, cls: type, **kwargs) -> nn.Module:
    """A cls instance holding bn's very Parameter and buffer objects, flags and mode."""
    # Built on the meta device (nothing allocated), then handed the originals' tensors.
    if bn.affine and bn.bias is None:
        kwargs["bias"] = False
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
              device="meta", **kwargs)
    for name in ("weight", "bias"):
        if name in new._parameters:
            new._parameters[name] = bn._parameters[name]
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if name in new._buffers:
            new._buffers[name] = bn._buffers[name]
    new.train(bn.training)
    if hasattr(bn, "qconfig"):
        new.qconfig = bn.qconfig
    return new


def replace_batchnorms(module: nn.Module) -> nn.Module:
    """Every nn.BatchNorm1d/2d/3d in module, at any depth, replaced by the bnkernels class
    (module itself if it is one), children in place; see convert_batchnorm."""
    if type(module) in _REPLACEMENTS:
        return converted(module, _REPLACEMENTS[type(module)])
    for name, child in module.named_children():
        new_child = replace_batchnorms(child)
        if new_child is not child:
            module.add_module(name, new_child)
    return module
