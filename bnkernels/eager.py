"""The eager fast path: a call repeated with the signature of one made before runs the
launches recorded for it, past the checks and the layers below (functional → autograd →
ops → backend).

Why: on small shapes the host time of those Python layers is the whole cost of a call
(bench/bench_launch.py --cpu), several times torch's own batch_norm.

What keeps it exact. A call's signature is
  - each tensor's type, dtype, shape, strides, device and requires_grad, and whether all
    their pointers are 16-byte aligned;
  - the scalars: training, momentum, eps, the activation;
  - the modes that pick a route: grad mode and inference mode.
The argument checks (functional.check_*), the route (autograd.direct and
_records_a_graph), the outputs' layout (layout.alloc_output) and the backend's replay key
read nothing else. So the first call of a signature runs in full, and where it made one
backend call that has a replayer (contract.Replayer) and handed the backend the caller's
own tensors (no copy), a later call of the signature allocates its outputs as ops.py does
and calls the replayer. A call that records an autograd graph does the same inside
autograd.ReplayedBatchNormFunction, and its backward keeps one replay per grad_y layout
and set of wanted gradients.

Never taken (the full path runs every time): torch.compile, torch.jit.trace, a dispatch
mode or a functorch transform, a forward-AD level, a tensor subclass, a momentum that is not
a float or None, an empty batch, an input the kernels can't read in place, a backend without
replays (CUDA C++, torch, the interpreter). Refused at a replay, so that call runs in
full: a backend choice or launch hook changed since the recording.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import autograd, backends, ops
from .backends.contract import backward_slots, forward_slots
from .caches import keep
from .layout import acc_dtype, alloc_output

ENTRIES_MAX = 4096  # signatures kept (a dynamic-shape workload would grow them forever)
_PLAIN = (Tensor, torch.nn.Parameter)
_len_dispatch_stack = torch._C._len_torch_dispatch_stack
_peek_functorch = torch._C._functorch.peek_interpreter_stack
_is_tracing = torch._C._is_tracing  # torch.jit.trace: the full path records torch's ops
# torch.autograd.graph.increment_version without its isinstance test
_increment_version = getattr(torch._C, "_increment_version",
                             torch.autograd.graph.increment_version)


def _signature(tensors: tuple, scalars: tuple) -> Optional[tuple]:
    """The call's signature (the module docstring), or None where it takes the full path."""
    if torch.compiler.is_compiling() or _len_dispatch_stack() or _is_tracing() or \
            _peek_functorch() is not None or getattr(forward_ad, "_current_level", 0) >= 0:
        return None
    key = [scalars, torch.is_grad_enabled(), torch.is_inference_mode_enabled()]
    bits = 0
    for t in tensors:
        if t is None:
            key.append(None)
            continue
        kind = type(t)
        if kind not in _PLAIN:
            return None
        key.append((kind, t.dtype, t.shape, t.stride(), t.device, t.requires_grad))
        bits |= t.data_ptr()
    return tuple(key) if bits % 16 == 0 else None


class _Listening:
    """ops.call_log listening for the duration: the backend calls made inside."""

    def __enter__(self) -> list:
        self.outer = ops.call_log.calls
        ops.call_log.calls = self.calls = []
        return self.calls

    def __exit__(self, *exc) -> None:
        ops.call_log.calls = self.outer


class Forward:
    """One forward signature's replay: outputs allocated as ops.run_forward allocates them,
    then the backend's replayer."""

    __slots__ = ("backend", "environment", "replayer", "channels", "acc", "training", "eps",
                 "activation", "updates", "graph", "dense_like_x", "var_sink", "backwards")

    def __init__(self, backend, replayer, x: Tensor, training: bool, eps: float,
                 activation: Optional[str], updates: bool, graph: bool):
        self.backend, self.replayer = backend, replayer
        # the backend chosen again where the environment is unchanged (None: select() asked)
        self.environment = backends.environment() if backends.cached_choice(x) else None
        self.eps, self.activation = eps, activation
        self.channels, self.acc = x.shape[1], acc_dtype(x.dtype)
        self.training, self.updates, self.graph = training, updates, graph
        # alloc_output(x) is empty_like(x) for x's strides (x dense in a torch layout)
        self.dense_like_x = alloc_output(x).stride() == torch.empty_like(x).stride()
        # The batch variance's output: written by every replay, read by none (the routes
        # here return y alone, autograd saves mean and rstd; the kernels update the
        # running variance from registers), so one buffer serves every call.
        self.var_sink = x.new_empty(self.channels, dtype=self.acc) if training else None
        self.backwards: dict = {}  # Backward replays, by run_backward's key

    def outputs(self, x, weight, bias, running_mean, running_var, num_batches_tracked,
                residual) -> Optional[tuple]:
        """(y, mean, rstd, None) of the call (no variance: var_sink), its launches made;
        None where the replay is refused (nothing launched)."""
        if (backends.environment() != self.environment if self.environment is not None
                else backends.select(x) is not self.backend):
            return None
        y = torch.empty_like(x) if self.dense_like_x else alloc_output(x)
        if self.training:
            c, acc, var = self.channels, self.acc, self.var_sink
            mean, rstd = x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc)
            if self.updates:
                slots = (x, weight, bias, residual, y, mean, rstd, var, None, None, None,
                         running_mean, running_var, num_batches_tracked)
                if not self.replayer(slots):
                    return None
                # written by kernels: autograd's version counters must move
                _increment_version((running_mean, running_var) if num_batches_tracked is None
                                   else (running_mean, running_var, num_batches_tracked))
                return y, mean, rstd, None
            slots = (x, weight, bias, residual, y, mean, rstd, var, None, None, None, None,
                     None, None)
        else:
            mean = rstd = var = None
            slots = (x, weight, bias, residual, y, None, None, None, running_mean, None,
                     running_var, None, None, None)
        if not self.replayer(slots):
            return None
        return y, mean, rstd, None

    def run_backward(self, grad_y, x, weight, bias, residual, output, mean, rstd, var, eps,
                     activation, need_dx, need_sums, need_dres, sum_dtypes=(None, None)):
        """ops.run_backward(..., placeholders=False, sum_dtypes) for this forward's saved
        tensors, replayed per (grad_y's layout, the gradients wanted)."""
        key = (grad_y.dtype, grad_y.stride(), grad_y.data_ptr() % 16 == 0, type(grad_y),
               need_dx, need_sums, need_dres, sum_dtypes)
        backward = self.backwards.get(key)
        if backward is not None:
            out = backward.run(grad_y, x, weight, bias, residual, output, mean, rstd, var)
            if out is not None:
                return out
        args = (grad_y, x, weight, bias, residual, output, mean, rstd, var, eps, activation,
                need_dx, need_sums, need_dres)
        with _Listening() as calls:
            out = ops.run_backward(*args, placeholders=False, sum_dtypes=sum_dtypes)
        backward = Backward.recorded(calls, args)
        if backward is not None:
            keep(self.backwards, ENTRIES_MAX, key, backward)
        return out


class Backward(NamedTuple):
    """One backward signature's replay (Forward.run_backward): ops.run_backward's outputs,
    then the backend's replayer."""

    backend: object
    replayer: Callable
    fused: bool  # an activation: bias, residual and output are read (ops.run_backward)
    need_dx: bool
    need_sums: bool
    dres_from: Optional[int]  # the slot dres is shaped like (residual 4, output 5), or None
    rounded: tuple  # the dtypes of GradSums' bias_grad and weight_grad (None: not made)

    @staticmethod
    def recorded(calls: list, args: tuple) -> Optional["Backward"]:
        """The replay of the one backend call in calls, or None."""
        if len(calls) != 1:
            return None
        backend, call = calls[0]
        grad_y, x, weight, bias, residual, output = args[:6]
        fused = args[10] is not None
        if not fused:
            bias = residual = output = None
        slots = backward_slots(call)
        if any(a is not b for a, b in zip(slots[:9], (x, grad_y, weight, bias, residual,
                                                     output, *args[6:9]))):
            return None  # a copy was made
        replayer = backend.backward_replayer(call)
        if replayer is None:
            return None
        dres_from = None if call.dres is None else (4 if residual is not None else 5)
        sums = call.sums
        rounded = (None, None) if sums is None else tuple(
            None if t is None else t.dtype for t in (sums.bias_grad, sums.weight_grad))
        return Backward(backend, replayer, fused, call.dx is not None, sums is not None,
                        dres_from, rounded)

    def run(self, grad_y, x, weight, bias, residual, output, mean, rstd, var):
        if backends.select(x) is not self.backend:
            return None
        if not self.fused:
            bias = residual = output = None
        dx = alloc_output(x) if self.need_dx else None
        dres = None
        if self.dres_from is not None:
            dres = alloc_output(residual if self.dres_from == 4 else output)
        sum_g = sum_gx = dbias = dweight = None
        if self.need_sums:
            c, acc = x.shape[1], acc_dtype(x.dtype)
            sum_g, sum_gx = x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc)
            rounded_g, rounded_gx = self.rounded
            dbias = None if rounded_g is None else x.new_empty(c, dtype=rounded_g)
            dweight = None if rounded_gx is None else x.new_empty(c, dtype=rounded_gx)
        slots = (x, grad_y, weight, bias, residual, output, mean, rstd, var, dx, dres, sum_g,
                 sum_gx, None, None, None, dbias, dweight)
        if not self.replayer(slots):
            return None
        return (dx, sum_g if dbias is None else dbias, sum_gx if dweight is None else dweight,
                dres)


_FORWARD: dict = {}


def forward(full: Callable[..., Tensor], x: Tensor, running_mean: Optional[Tensor],
            running_var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
            training: bool, momentum: Optional[float], eps: float,
            num_batches_tracked: Optional[Tensor], activation: Optional[str],
            residual: Optional[Tensor]) -> Tensor:
    """batch_norm's y: replayed where this signature has a replay, else full(x, ...,
    residual) (the checks, then functional.batch_norm_impl), recorded where it can be."""
    tensors = (x, weight, bias, running_mean, running_var, num_batches_tracked, residual)
    key = None
    if momentum is None or type(momentum) is float:
        key = _signature(tensors, (training, momentum, eps, activation))
    entry = None
    if key is not None:
        try:
            entry = _FORWARD.get(key)
        except TypeError:  # an unhashable scalar: the checks will say what is wrong with it
            key = None
    if entry is not None:
        if not entry.graph:
            out = entry.outputs(x, weight, bias, running_mean, running_var,
                                num_batches_tracked, residual)
            if out is not None:
                return out[0]
        else:
            try:
                return autograd.ReplayedBatchNormFunction.apply(
                    x, weight, bias, residual, entry,
                    (running_mean, running_var, num_batches_tracked))
            except autograd.ReplayRefused:
                pass
    args = (x, running_mean, running_var, weight, bias, training, momentum, eps,
            num_batches_tracked, activation, residual)
    if key is None:
        return full(*args)
    with _Listening() as calls:
        y = full(*args)
    entry = _recorded(calls, tensors, training, num_batches_tracked, y)
    if entry is not None:
        keep(_FORWARD, ENTRIES_MAX, key, entry)
    return y


def _recorded(calls: list, tensors: tuple, training: bool,
              num_batches_tracked: Optional[Tensor], y: Tensor) -> Optional[Forward]:
    """The replay of a full call whose backend calls are calls, or None where it has none."""
    if len(calls) != 1:
        return None  # an empty batch (none), or a route this module does not know
    backend, call = calls[0]
    x, weight, bias, running_mean, running_var, _, residual = tensors
    update = call.update
    updates = update is not None
    if updates and not (update.mean is running_mean and update.var is running_var and
                        update.num_batches_tracked is num_batches_tracked):
        return None
    if not updates and num_batches_tracked is not None:
        return None  # a counter moved by a torch op (no running statistics to update)
    slots = forward_slots(call)
    running = (None, None, None) if training else (running_mean, None, running_var)
    if slots[4] is not y and y.grad_fn is None:
        return None
    if any(a is not b for a, b in zip(slots[:4] + slots[8:11],
                                      (x, weight, bias, residual, *running))):
        return None  # a copy was made, or a reshaped weight
    replayer = backend.forward_replayer(call)
    if replayer is None:
        return None
    return Forward(backend, replayer, x, training, call.eps, call.activation, updates,
                   graph=y.grad_fn is not None)
