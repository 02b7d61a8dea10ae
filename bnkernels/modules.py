"""bnkernels.BatchNorm1d/2d/3d: the torch classes with bnkernels' forward, and
BatchNormAct1d/2d/3d: the same with a fused activation (and residual) epilogue.

Subclassing the torch classes gives the same constructor, parameters, buffers,
state_dict keys, repr and input-dimension checks; only forward changes.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from . import activations, eager
from .functional import checked_batch_norm, check_momentum, recording_for_export


class _BatchNormForward:
    """forward() for the subclasses of torch's _BatchNorm below; mirrors torch's logic.

    Recorded for export (torch.jit.trace, torch.export, both ONNX exporters), a call is
    recorded as torch's own ops (functional.torch_ops_batch_norm), which run without
    bnkernels. torch.jit.script can't compile this forward: it is refused up front."""

    def forward(self, input: Tensor) -> Tensor:
        return self._fused_forward(input, None, None)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first, before it reads any source: the place for a clear
        # error (it would otherwise fail deep in the parser of the modules this one calls).
        name = type(self).__name__
        raise RuntimeError(
            f"torch.jit.script can't compile bnkernels' {name}: its forward launches kernels "
            "from Python. Record the model with torch.jit.trace or torch.export instead (both "
            f"record torch's own batch_norm in place of bnkernels' {name}), or script it "
            "before convert_batchnorm.")

    def _fused_forward(self, input: Tensor, activation: Optional[str],
                       residual: Optional[Tensor]) -> Tensor:
        self._check_input_dim(input)
        # Batch statistics in training, and in eval too when no running statistics exist.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep_running else None
        running_var = self.running_var if keep_running else None
        momentum = check_momentum(self.momentum)  # before num_batches_tracked moves
        num_batches_tracked = None  # the counter this call increments (as torch's add_(1))
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            num_batches_tracked = self.num_batches_tracked
        if momentum is None and num_batches_tracked is None:
            momentum = 0.0  # torch's factor where there is no counter to average with
        # the checks run before anything is written: a call that raises changes nothing
        return eager.forward(checked_batch_norm, input, running_mean, running_var, self.weight,
                             self.bias, use_batch_stats, momentum, self.eps,
                             num_batches_tracked, activation, residual)


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on bnkernels' kernels; input (N, C) or (N, C, L)."""


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on bnkernels' kernels; input (N, C, H, W)."""


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on bnkernels' kernels; input (N, C, D, H, W)."""


class _BatchNormActForward(_BatchNormForward):
    """forward(x, residual=None) = activation(batch_norm(x) + residual), one fused pass.

    The parameters and buffers are nn.BatchNorm*'s (a checkpoint loads either way);
    activation is "relu" (default), "silu", "gelu" (erf form) or None. residual must be
    shaped and typed like x, except in modules made by convert_batchnorm(fuse=True): the
    graph's add may have broadcast, so there a residual unlike x takes the unfused path."""

    _unfused_if_mismatch = False

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: Optional[str] = "relu", **kwargs):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **kwargs)
        self.activation = activations.check(activation)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        # Recorded for export, the unfused form is the one the graph's torch ops compute
        # (and comparing shapes in a trace would warn).
        if (self._unfused_if_mismatch and isinstance(residual, Tensor)
                and (recording_for_export() or residual.shape != input.shape
                     or residual.dtype != input.dtype)):
            return activations.apply(self._fused_forward(input, None, None) + residual,
                                     self.activation)
        return self._fused_forward(input, self.activation, residual)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


class BatchNormAct1d(_BatchNormActForward, nn.BatchNorm1d):
    """BatchNorm1d + activation (+ residual), fused; input (N, C) or (N, C, L)."""


class BatchNormAct2d(_BatchNormActForward, nn.BatchNorm2d):
    """BatchNorm2d + activation (+ residual), fused; input (N, C, H, W)."""


class BatchNormAct3d(_BatchNormActForward, nn.BatchNorm3d):
    """BatchNorm3d + activation (+ residual), fused; input (N, C, D, H, W)."""
