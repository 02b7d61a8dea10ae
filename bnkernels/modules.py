"""bnkernels.BatchNorm1d/2d/3d: the torch classes with bnkernels' forward.

Subclassing the torch classes gives the same constructor, parameters, buffers,
state_dict keys, repr and input-dimension checks; only forward changes.
"""
from __future__ import annotations

from torch import Tensor, nn

from .functional import batch_norm_impl, check_batch_norm_args


class _BatchNormForward:
    """forward() for the subclasses of torch's _BatchNorm below; mirrors torch's logic."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # Batch statistics in training, and in eval too when no running statistics exist.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep_running else None
        running_var = self.running_var if keep_running else None
        # Checked before num_batches_tracked moves: a call that raises changes nothing.
        check_batch_norm_args(input, running_mean, running_var, self.weight, self.bias,
                              use_batch_stats, self.eps)
        momentum = 0.0 if self.momentum is None else self.momentum
        num_batches_tracked = None
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum, num_batches_tracked = None, self.num_batches_tracked
        return batch_norm_impl(input, running_mean, running_var, self.weight, self.bias,
                               use_batch_stats, momentum, self.eps, num_batches_tracked)


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on bnkernels' kernels; input (N, C) or (N, C, L)."""


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on bnkernels' kernels; input (N, C, H, W)."""


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on bnkernels' kernels; input (N, C, D, H, W)."""
