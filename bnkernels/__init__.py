"""bnkernels: fused Batch Normalization kernels for PyTorch, in Triton.

    bnkernels.BatchNorm1d / BatchNorm2d / BatchNorm3d   drop-in nn.BatchNorm* subclasses
    bnkernels.BatchNormAct1d / 2d / 3d                   BatchNorm + activation (+ residual), fused
    bnkernels.batch_norm                                 like torch.nn.functional.batch_norm
    bnkernels.convert_batchnorm(model, fuse=False)       swap a model's BatchNorm modules
    bnkernels.BatchNormDropAct2d                         timm's BatchNormAct2d, converted
    bnkernels.fold_conv_bn(model)                        fold eval BatchNorms into the layer before
    bnkernels.SyncBatchNorm                              statistics over a process group

Backend: BNKERNELS_BACKEND = auto | triton | cuda | torch (see bnkernels/backends/).
The arithmetic: docs/math.md; the layers: docs/architecture.md.
"""
from .convert import convert_batchnorm
from .fold import FoldReport, fold_conv_bn
from .functional import batch_norm
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d,
                      BatchNormAct3d)
from .norm_act import BatchNormDropAct2d
from .replace import ConvertReport
from .sync_batch_norm import SyncBatchNorm

__version__ = "0.1.0"

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d", "BatchNormAct2d",
           "BatchNormAct3d", "BatchNormDropAct2d", "ConvertReport", "FoldReport", "SyncBatchNorm",
           "batch_norm", "convert_batchnorm", "fold_conv_bn"]
