"""What a backend provides, and what it is given: the one contract between ops.py and the
kernels (docs/architecture.md draws the layers).

A backend is a `Backend`: two methods, `forward` and `backward`, each given one call record
(`ForwardCall`, `BackwardCall`) and returning nothing. Records are read, never modified
(plain slotted dataclasses, not frozen ones: a frozen one costs twice the host time to
make, on every call). The record names every tensor once,
each field meaning one thing. It holds the outputs too: ops.py (`run_forward`,
`run_backward`) allocates them in torch's layout, and the backend writes into them.

What ops.py has done before a backend sees a call, so that no backend repeats it:
  - the batch is not empty (an empty one never reaches a backend: ops.py returns its
    empty output and zero statistics or sums itself);
  - every element tensor is readable through (N, C, S) strides (layout.kernel_ready);
  - every per-channel tensor is a (C,) vector, possibly strided (a backend reads it
    through its stride or copies it);
  - the outputs exist, are not aliased with each other, and are in torch's layout
    (layout.alloc_output); an output the caller does not want is None.

The passes every backend runs, by these names (docs/math.md has their arithmetic):
  reduce  per-channel partial reductions over a share of the rows: Welford (mean, var)
          forward; (sum g, sum g*xhat) backward
  merge   the shares' partials folded into one result per channel, in a fixed order
  apply   the elementwise pass: y = act(bn(x) + residual) forward; dx (and dres) backward
  fused   reduce and apply in one launch (the CUDA backend, one share per channel)
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor


@dataclass(slots=True)
class Normalizer:
    """The per-channel statistics a pass normalizes with: mean, and exactly one of rstd and
    var. rstd = 1/sqrt(var + eps) is computed from var by the backend when var is given."""

    mean: Tensor
    rstd: Optional[Tensor] = None  # the batch's rstd, as the training forward saved it
    var: Optional[Tensor] = None  # a variance: the running one, or SyncBatchNorm's global one

    def __post_init__(self):
        if (self.rstd is None) == (self.var is None):
            raise ValueError("a Normalizer holds exactly one of rstd and var")


@dataclass(slots=True)
class BatchStats:
    """Outputs of a training forward, per channel, in the accumulation dtype."""

    mean: Tensor
    rstd: Tensor  # 1 / sqrt(var + eps)
    var: Tensor  # the biased variance (the one the gradient flows through)


@dataclass(slots=True)
class GradSums:
    """Per-channel sums of the backward pass, in the accumulation dtype."""

    sum_g: Tensor  # sum of g = dL/dz over the channel: dbeta
    sum_gx: Tensor  # sum of g * xhat: dgamma
    # The same sums again, rounded to these tensors' dtypes (the parameters', float16 or
    # bfloat16), where given: half-precision parameters' gradients written by the launch
    # that finishes the sums, with no cast after it. sum_g and sum_gx stay in the
    # accumulation dtype: the three-path dx reads them.
    bias_grad: Optional[Tensor] = None
    weight_grad: Optional[Tensor] = None


@dataclass(slots=True)
class RunningUpdate:
    """The running statistics a training forward updates in place, in the launches that
    make the batch statistics (no extra device op, no host synchronisation):
        running = lerp(running, batch, f), the batch variance unbiased (times m / (m - 1))
        f = momentum, or (momentum None: the cumulative average) 1 / (num_batches_tracked + 1)
    num_batches_tracked, where given, is incremented by 1 (a module's training step)."""

    mean: Tensor  # (C,) written
    var: Tensor  # (C,) written
    momentum: Optional[float]
    num_batches_tracked: Optional[Tensor]  # () int64, written

    def __post_init__(self):
        if self.momentum is None and self.num_batches_tracked is None:
            raise ValueError("a cumulative average (momentum None) counts num_batches_tracked")


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         count, momentum: Optional[float],
                         num_batches_tracked: Optional[Tensor]) -> None:
    """running = (1 - f) * running + f * batch, with the unbiased batch variance.

    count: the values per channel, an int, or a tensor (SyncBatchNorm's global count).
    f = momentum, or 1 / num_batches_tracked (cumulative average) when momentum is None
    (the counter already incremented for this step): computed on the device, with no host
    synchronisation (torch's module reads num_batches_tracked on the host here).
    """
    acc = mean.dtype
    factor = momentum if momentum is not None else num_batches_tracked.to(acc).reciprocal()
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        for buf, batch in ((running_mean, mean), (running_var, unbiased)):
            if buf.dtype == acc:
                buf.lerp_(batch, factor)
            else:  # half/bfloat16 buffers: blend in float32, round once
                buf.copy_(torch.lerp(buf.to(acc), batch, factor))


def apply_update(update: "RunningUpdate", mean: Optional[Tensor], var: Optional[Tensor],
                 count: int) -> None:
    """A RunningUpdate as torch ops: the counter first, then the statistics it weighs. An
    empty batch (count 0; mean and var unread) counts, but moves no statistic."""
    if update.num_batches_tracked is not None:
        update.num_batches_tracked.add_(1)
    if count > 0:
        update_running_stats(update.mean, update.var, mean, var, count, update.momentum,
                             update.num_batches_tracked)


@dataclass(slots=True)
class ForwardCall:
    """y = act(bn(x) + residual), bn normalizing with the batch's statistics (batch given)
    or with the running ones (running given); exactly one of the two."""

    x: Tensor
    weight: Optional[Tensor]  # gamma, (C,); None: 1
    bias: Optional[Tensor]  # beta, (C,); None: 0
    eps: float
    activation: Optional[str]  # activations.ACTIVATIONS
    residual: Optional[Tensor]  # like x: added to bn(x) before the activation
    y: Optional[Tensor]  # written; None: only the statistics are wanted (batch_stats)
    running: Optional[Normalizer] = None  # eval: (running mean, running var)
    batch: Optional[BatchStats] = None  # training: written with x's statistics
    update: Optional[RunningUpdate] = None  # training: the running statistics to update

    def __post_init__(self):
        if (self.running is None) == (self.batch is None):
            raise ValueError("a ForwardCall normalizes with exactly one of running and batch")
        if self.update is not None and (self.batch is None or self.y is None):
            raise ValueError("running statistics are updated by a training forward with y")


@dataclass(slots=True)
class BackwardCall:
    """The gradients of y = act(bn(x) + residual) from grad_y = dL/dy.

    With g = dL/dz (dL/dy through the activation's derivative), xhat = (x - mean) * rstd:
      sums  (sum g, sum g*xhat), over this x
      dx    through_batch_stats: gamma * rstd * (g - sum_g/count - xhat * sum_gx/count),
            the sums being given_sums where given (count: given_count), else this x's
            (count: N*S); otherwise (eval: constant statistics) gamma * rstd * g
      dres  g, the residual's gradient (only asked for with an activation; without one it
            is grad_y itself, which the caller passes on)
    """

    grad_y: Tensor
    x: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]  # read only to recompute z for an activation
    eps: float
    activation: Optional[str]
    residual: Optional[Tensor]  # silu/gelu after a residual: to recompute z
    output: Optional[Tensor]  # relu after a residual: the forward's y (relu' = y > 0)
    stats: Normalizer  # what the forward normalized with
    through_batch_stats: bool  # the statistics depend on x (training, SyncBatchNorm)
    dx: Optional[Tensor] = None  # written where given
    dres: Optional[Tensor] = None  # written where given
    sums: Optional[GradSums] = None  # written where given
    given_sums: Optional[GradSums] = None  # sums made elsewhere (SyncBatchNorm's global ones)
    given_count: Optional[Tensor] = None  # (C,): the values each given sum is over

    def __post_init__(self):
        if (self.given_sums is None) != (self.given_count is None):
            raise ValueError("given_sums and given_count come together")
        if self.residual is not None and self.output is not None:
            raise ValueError("z is recomputed from the residual, or relu's mask read from "
                             "the output: not both")
        if self.output is not None and self.activation != "relu":
            raise ValueError("the saved output serves only as relu's mask")


def forward_slots(call: ForwardCall) -> tuple:
    """Every tensor of a ForwardCall, None where absent, in the one order a forward
    replayer takes them: x, weight, bias, residual, y, batch (mean, rstd, var), running
    (mean, rstd, var), update (mean, var, num_batches_tracked)."""
    batch, running, update = call.batch, call.running, call.update
    return (call.x, call.weight, call.bias, call.residual, call.y,
            *((batch.mean, batch.rstd, batch.var) if batch else (None,) * 3),
            *((running.mean, running.rstd, running.var) if running else (None,) * 3),
            *((update.mean, update.var, update.num_batches_tracked) if update else
              (None,) * 3))


def backward_slots(call: BackwardCall) -> tuple:
    """Every tensor of a BackwardCall, None where absent, in the one order a backward
    replayer takes them: x, grad_y, weight, bias, residual, output, stats (mean, rstd,
    var), dx, dres, sums (sum_g, sum_gx), given_sums (sum_g, sum_gx), given_count, sums
    (bias_grad, weight_grad)."""
    stats, sums, given = call.stats, call.sums, call.given_sums
    return (call.x, call.grad_y, call.weight, call.bias, call.residual, call.output,
            stats.mean, stats.rstd, stats.var, call.dx, call.dres,
            *((sums.sum_g, sums.sum_gx) if sums else (None, None)),
            *((given.sum_g, given.sum_gx) if given else (None, None)), call.given_count,
            *((sums.bias_grad, sums.weight_grad) if sums else (None, None)))


# A replayer: the launches of a call made before, run again on another call's tensors
# (forward_slots or backward_slots order), which must have the recorded call's signature
# (each tensor's dtype, strides and 16-byte alignment, x's shape and device, the scalars).
# It returns False, and launches nothing, where the launch hooks it was recorded under have
# changed since (the caller then makes the call in full).
Replayer = Callable[[tuple], bool]


class Backend(abc.ABC):
    """One implementation of the passes: backends/triton and backends/cuda (as
    LauncherBackend), backends/reference.py (plain torch)."""

    name: str  # what BNKERNELS_BACKEND calls it

    @abc.abstractmethod
    def forward(self, call: ForwardCall) -> None:
        """Writes call.y (where given) and, in training, call.batch; applies call.update."""

    @abc.abstractmethod
    def backward(self, call: BackwardCall) -> None:
        """Writes call.dx, call.dres and call.sums, each where given."""

    def launch_counts(self) -> dict:
        """Kernel launches so far, by pass (reduce, merge, apply, fused): the tests read it to
        prove the kernels ran. A backend without kernels launches none."""
        return {}

    def forward_replayer(self, call: ForwardCall) -> Optional[Replayer]:
        """After forward(call): a Replayer of its launches, or None (not replayable; a
        backend without replays)."""
        return None

    def backward_replayer(self, call: BackwardCall) -> Optional[Replayer]:
        """After backward(call): a Replayer of its launches, or None."""
        return None

    def __repr__(self) -> str:
        return f"<bnkernels backend {self.name!r}>"


class LauncherBackend(Backend):
    """A backend whose passes are a launcher's forward(call) and backward(call) functions
    (the Triton and CUDA backends: each has its launch.py)."""

    def __init__(self, name: str, forward: Callable[[ForwardCall], None],
                 backward: Callable[[BackwardCall], None], launch_counts: Callable[[], dict],
                 replayers: Optional[tuple] = None):
        self.name = name
        self._forward, self._backward, self._launch_counts = forward, backward, launch_counts
        self._replayers = replayers  # (forward_replayer, backward_replayer) functions

    def forward(self, call: ForwardCall) -> None:
        self._forward(call)

    def backward(self, call: BackwardCall) -> None:
        self._backward(call)

    def launch_counts(self) -> dict:
        return self._launch_counts()

    def forward_replayer(self, call: ForwardCall) -> Optional[Replayer]:
        return self._replayers[0](call) if self._replayers else None

    def backward_replayer(self, call: BackwardCall) -> Optional[Replayer]:
        return self._replayers[1](call) if self._replayers else None
