"""bnkernels.convert_batchnorm: a model's BatchNorm modules on bnkernels' kernels, with or
without their epilogues fused, and a report of what was left and why."""
from __future__ import annotations

from torch import nn

from .fuse import fuse_batchnorm
from .replace import ConvertReport, log, replace_batchnorms


def convert_batchnorm(module: nn.Module, fuse: bool = False, return_report: bool = False):
    """Every nn.BatchNorm1d/2d/3d in module, at any depth, replaced by the bnkernels class
    (module itself if it is one); timm's BatchNormAct2d by BatchNormDropAct2d (its drop and
    act kept, the activation fused where bnkernels fuses it). Parameters, buffers, training
    flag, device and dtype are kept. Children are replaced in place; the returned module is
    module unless module is itself a BatchNorm.

    Left as they are, with the reason (the report, and the "bnkernels.convert" logger at
    INFO): subclasses with code of their own, nn.SyncBatchNorm (see
    bnkernels.SyncBatchNorm.convert_sync_batchnorm), lazy BatchNorms before their first
    call, frozen BatchNorms (see fold_conv_bn).

    fuse=True: also fuse each BN's activation (and residual add) into one BatchNormAct op
    with a torch.fx pass (fuse.py); the result is then a new fx.GraphModule sharing the
    model's Parameters and buffers, and the model itself is left unchanged.
    return_report: return (module, ConvertReport)."""
    report = ConvertReport()
    result = fuse_batchnorm(module, report) if fuse else replace_batchnorms(module, report)
    for line in str(report).splitlines():
        log.info(line)
    return (result, report) if return_report else result
