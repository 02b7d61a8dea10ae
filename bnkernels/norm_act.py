"""BatchNormDropAct2d: timm's BatchNormAct2d on bnkernels' kernels.

timm builds EfficientNet, RegNetY, MobileNetV3, DenseNet, CSPNet, LCNet, ... from
timm.layers.BatchNormAct2d: an nn.BatchNorm2d subclass that applies `self.drop` (dropout,
or nn.Identity) and then `self.act` (an activation module, or nn.Identity) to the BN's
output. This class keeps that structure, so state_dicts load either way (an activation
with parameters, nn.PReLU say, keeps its `act.*` keys), and runs the BN on bnkernels'
kernels, with the activation fused into the BN's passes where bnkernels fuses it (relu,
silu, gelu in its erf form, no dropout in between) and the original modules after it
otherwise.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from . import activations
from .modules import BatchNorm2d


def _is_identity_now(drop: nn.Module) -> bool:
    """Whether drop passes its input through unchanged in its current mode."""
    if isinstance(drop, nn.Identity):
        return True
    return isinstance(drop, nn.modules.dropout._DropoutNd) and (not drop.training or drop.p == 0)


class BatchNormDropAct2d(BatchNorm2d):
    """act(drop(batch_norm(x))), as timm's BatchNormAct2d, with bnkernels' BatchNorm2d
    (same constructor arguments as nn.BatchNorm2d, plus the drop and act modules)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 drop: Optional[nn.Module] = None, act: Optional[nn.Module] = None, **kwargs):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **kwargs)
        self.drop = nn.Identity() if drop is None else drop
        self.act = nn.Identity() if act is None else act

    def forward(self, input: Tensor) -> Tensor:
        fusable, activation = activations.of_module(self.act)
        if fusable and _is_identity_now(self.drop):
            return self._fused_forward(input, activation, None)
        return self.act(self.drop(super().forward(input)))
