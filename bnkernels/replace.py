"""Swapping torch's BatchNorm modules for bnkernels' in place, like
nn.SyncBatchNorm.convert_sync_batchnorm: what convert_batchnorm does without fusion (and
what the fusion pass, the fold and SyncBatchNorm build on). The new modules take over the
very same Parameter and buffer objects (and submodules), so optimizers and state_dicts
keep working. What is left on torch's (or timm's) code is reported with the reason
(ConvertReport, and the "bnkernels.convert" logger)."""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormForward
from .norm_act import BatchNormDropAct2d

log = logging.getLogger("bnkernels.convert")

# Exact classes only: a user's subclass may have its own forward, which must not be lost.
_REPLACEMENTS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d,
                 nn.BatchNorm3d: BatchNorm3d}
# Classes of other libraries, by qualified name (bnkernels imports none of them): timm's
# BatchNorm + drop + act, whose forward is nn.BatchNorm2d's followed by self.drop, self.act.
_NAMED_REPLACEMENTS = {"timm.layers.norm_act.BatchNormAct2d": BatchNormDropAct2d}
# torch 2.13's BatchNorm takes bias=False (a weight with no bias); torch 2.11's has no such
# argument, and there a bias set to None by hand is carried over by converted()'s copy.
_TAKES_BIAS_FLAG = "bias" in inspect.signature(_NormBase.__init__).parameters
# BatchNorms with constant statistics and affine, as buffers: what fold_conv_bn folds.
FROZEN_BATCHNORMS = ("torchvision.ops.misc.FrozenBatchNorm2d",
                     "timm.layers.norm.FrozenBatchNorm2d",
                     "timm.layers.norm_act.FrozenBatchNormAct2d")
_SYNC_HINT = ("statistics over a process group: bnkernels.SyncBatchNorm."
              "convert_sync_batchnorm(model) converts it")


def qualified_name(module: nn.Module) -> str:
    kind = type(module)
    return f"{kind.__module__}.{kind.__qualname__}"


def is_frozen_batchnorm(module: nn.Module) -> bool:
    return qualified_name(module) in FROZEN_BATCHNORMS


@dataclass
class ConvertReport:
    """What convert_batchnorm did: the BatchNorms converted (name, original class), those
    fused with their epilogue (name, what was fused), and those left, with the reason."""

    converted: List[Tuple[str, str]] = field(default_factory=list)
    fused: List[Tuple[str, str]] = field(default_factory=list)
    left: List[Tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} BatchNorm(s), fused {len(self.fused)}, "
                 f"left {len(self.left)}"]
        lines += [f"  fused   {name}: {what}" for name, what in self.fused]
        lines += [f"  left    {name}: {why}" for name, why in self.left]
        return "\n".join(lines)


def _why_left(module: nn.Module) -> Optional[str]:
    """Why a BatchNorm-like module stays as it is (None: it is not one, or it is ours)."""
    if isinstance(module, _BatchNormForward):
        return None  # bnkernels' already
    name = qualified_name(module)
    if is_frozen_batchnorm(module):
        return (f"{name} has constant statistics (a frozen BatchNorm): fold_conv_bn folds it "
                "into the layer before it")
    if name == "timm.layers.norm_act.SyncBatchNormAct" or isinstance(module, nn.SyncBatchNorm):
        return f"{name} computes " + _SYNC_HINT
    if not isinstance(module, _BatchNorm):
        return None
    if isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return (f"{name} is a lazy BatchNorm before its first call (its size is not known "
                "yet): run the model once, then convert it")
    return (f"{name} is a subclass of {type(module).__mro__[1].__name__} with code of its own, "
            "which converting would lose: it stays on torch's kernels")


def converted(bn: nn.modules.batchnorm._BatchNorm, cls: type, **kwargs) -> nn.Module:
    """A cls instance holding bn's very Parameter and buffer objects, flags and mode."""
    # Built on the meta device (nothing allocated), then handed the originals' tensors.
    if bn.affine and bn.bias is None and _TAKES_BIAS_FLAG:
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


def _replacement(module: nn.Module):
    """The bnkernels class that module converts to, or None."""
    return _REPLACEMENTS.get(type(module)) or _NAMED_REPLACEMENTS.get(qualified_name(module))


def convert_one(module: nn.Module, cls: type) -> nn.Module:
    """converted(), with timm's drop and act modules handed over where cls keeps them."""
    if cls is BatchNormDropAct2d:
        return converted(module, cls, drop=module.drop, act=module.act)
    return converted(module, cls)


def replace_batchnorms(module: nn.Module, report: Optional[ConvertReport] = None,
                       prefix: str = "") -> nn.Module:
    """Every nn.BatchNorm1d/2d/3d (and timm BatchNormAct2d) in module, at any depth,
    replaced by the bnkernels class (module itself if it is one), children in place; see
    convert_batchnorm. report: filled with what was converted and what was left."""
    cls = _replacement(module)
    if cls is not None:
        if report is not None:
            report.converted.append((prefix or type(module).__name__, type(module).__name__))
        return convert_one(module, cls)
    why = _why_left(module)
    if why is not None:
        if report is not None:
            report.left.append((prefix or type(module).__name__, why))
        return module
    if isinstance(module, _BatchNormForward):
        return module  # bnkernels' already (its children, if any, are its epilogue)
    for name, child in module.named_children():
        new_child = replace_batchnorms(child, report, f"{prefix}.{name}" if prefix else name)
        if new_child is not child:
            module.add_module(name, new_child)
    return module
