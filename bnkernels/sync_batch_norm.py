"""bnkernels.SyncBatchNorm: BatchNorm statistics over the whole global batch of a process group.

Forward: each rank's kernels produce its per-channel partial (count, mean, M2); one
all_gather (3*C values per rank) brings every rank all of them, and every rank merges them
in rank order with Chan's formula (docs/math.md), exactly and identically — no
variance rebuilt from invstd. Then the eval-mode kernel normalizes with the global mean and
variance. Backward: the kernels' per-channel sums (sum g, sum g*xhat) over the local batch,
one all_reduce of those 2*C values, then the input gradient from the global sums over the
global count.
The weight and bias gradients are the local sums, as in torch.nn.SyncBatchNorm: DDP
all-reduces parameter gradients itself.

Uneven batches and empty local batches (count 0) are merged as they are. Outside an
initialised process group, with a world of one, or in eval mode with running statistics, it
is a plain bnkernels BatchNorm. The collectives are torch.distributed's, so gloo (CPU
tensors) and NCCL (CUDA tensors) both work.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .backends.contract import update_running_stats
from .replace import converted
from .functional import check_batch_norm_args, check_momentum
from .layout import ncs_shape
from .modules import _BatchNormForward


def merge_partials(parts: list) -> tuple:
    """(count, mean, var) from per-rank (count, mean, M2) rows, merged in rank order:
    n = n_a + n_b; d = mean_b - mean_a; mean = mean_a + d*n_b/n; M2 = M2_a + M2_b + d^2*n_a*n_b/n."""
    count, mean, m2 = parts[0]
    for n_b, mean_b, m2_b in parts[1:]:
        total = count + n_b
        w_b = torch.where(total > 0, n_b / total.clamp(min=1), torch.zeros_like(total))
        delta = mean_b - mean
        mean = mean + delta * w_b
        m2 = m2 + m2_b + delta * delta * count * w_b
        count = total
    return count, mean, m2 / count.clamp(min=1)


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked,
                momentum, eps, group, world):
        mean, var = torch.ops.bnkernels.batch_norm_stats(x)
        n, _, s = ncs_shape(x)
        local = torch.stack([torch.full_like(mean, n * s), mean, var * (n * s)])
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=group)
        count, mean, var = merge_partials([tuple(g) for g in gathered])
        y = torch.ops.bnkernels.batch_norm_fwd(x, weight, bias, mean, var, False, eps, None,
                                                None)[0]
        if running_mean is not None:
            update_running_stats(running_mean, running_var, mean, var, count, momentum,
                                 num_batches_tracked)
        ctx.save_for_backward(x, weight, mean, var, count)
        ctx.eps, ctx.group = eps, group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, mean, var, count = ctx.saved_tensors
        need_dx, need_dweight, need_dbias = ctx.needs_input_grad[:3]
        _, sum_g, sum_gx, _ = torch.ops.bnkernels.batch_norm_bwd(
            grad_y, x, weight, None, None, None, mean, None, var, ctx.eps, None, False, True,
            False)
        dx = None
        if need_dx:
            sums = torch.stack([sum_g, sum_gx])
            dist.all_reduce(sums, group=ctx.group)
            dx = torch.ops.bnkernels.batch_norm_input_grad(
                grad_y, x, weight, mean, var, sums[0], sums[1], count, ctx.eps)
        return (dx, sum_gx.to(weight.dtype) if need_dweight else None,
                sum_g.to(ctx.bias_dtype) if need_dbias else None,
                None, None, None, None, None, None, None)


class SyncBatchNorm(_BatchNormForward, nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm (same constructor, state_dict and checks) on bnkernels' kernels,
    with an exact Welford merge across ranks. Communication per layer: 3*C values forward
    (all_gather from each rank), 2*C backward (all_reduce)."""

    def _world(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: Tensor) -> Tensor:
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        world = self._world() if use_batch_stats else 1
        if world == 1:
            return super().forward(input)
        self._check_input_dim(input)
        keep_running = self.training and self.track_running_stats
        running_mean = self.running_mean if keep_running else None
        running_var = self.running_var if keep_running else None
        check_batch_norm_args(input, running_mean, running_var, self.weight, self.bias, True,
                              self.eps, local_count_check=False)
        momentum = check_momentum(self.momentum)
        num_batches_tracked = None
        if keep_running and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            num_batches_tracked = self.num_batches_tracked
        return _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, running_mean, running_var,
            num_batches_tracked, momentum, self.eps, self.process_group, world)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Every BatchNorm*d (torch's or bnkernels') in module replaced by this class, in place
        where it is a child, sharing the original Parameter and buffer objects."""
        if isinstance(module, _BatchNorm) and not isinstance(module, cls):
            return converted(module, cls, process_group=process_group)
        for name, child in module.named_children():
            new_child = cls.convert_sync_batchnorm(child, process_group)
            if new_child is not child:
                module.add_module(name, new_child)
        return module
