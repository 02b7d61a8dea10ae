"""Real models for the benchmarks and the tests: torchvision's and timm's where they are
installed, bench/resnet.py's ResNet-50 where torchvision is not.

import_torchvision() is the one place that deals with a torchvision whose C extension does
not load beside this torch (the registry's torchvision wheel is a CUDA build; on a
CPU-only torch its extension fails to load, and its import then stops while registering
fake kernels for torchvision::nms and torchvision::qnms, ops the extension would have
defined). The models use neither op, so defining the two schemas first lets the import
finish. It is applied only when the import fails that way: a torchvision whose extension
loads (the GPU machine's) is imported as it is.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

# The schemas torchvision's extension would have registered (torchvision/csrc/ops/nms.cpp).
_MISSING_OPS = {"nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"}
_LIBRARIES = []  # the torch.library.Library objects must outlive the import


def import_torchvision():
    """torchvision, or None where it is not installed."""
    try:
        return importlib.import_module("torchvision")
    except ImportError:
        return None
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the half-imported package
    library = torch.library.Library("torchvision", "DEF")
    for op, schema in _MISSING_OPS.items():
        library.define(op + schema)
    _LIBRARIES.append(library)
    return importlib.import_module("torchvision")


def import_timm():
    """timm (after torchvision, which it may import), or None where it is not installed."""
    import_torchvision()
    try:
        return importlib.import_module("timm")
    except ImportError:
        return None


def resnet50():
    """(model, name): torchvision's ResNet-50 where torchvision is installed, else the
    self-built one of bench/resnet.py (the same architecture and BatchNorm count)."""
    torchvision = import_torchvision()
    if torchvision is not None:
        return torchvision.models.resnet50(), "torchvision_resnet50"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import resnet

    return resnet.resnet50(), "bench_resnet50"
