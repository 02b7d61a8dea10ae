"""The Triton backend's launchers: a ForwardCall or BackwardCall (backends/contract.py) as
launches of kernels.py's three kernels, shaped by plan.py."""
from __future__ import annotations

import collections
import functools
import os
import struct
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ...activations import code
from ...caches import keep
from ...layout import acc_dtype, ncs_shape, ncs_strides
from ..contract import (BackwardCall, ForwardCall, GradSums, Normalizer, RunningUpdate,
                        backward_slots, forward_slots)
from .interpreter_compat import patch_interpreter
from .kernels import _apply_kernel, _merge_kernel, _reduce_kernel
from .persistent import _persistent_kernel
from . import persistent_plan
from . import plan as plan_module
from .plan import (KernelLayout, LaunchPlan, channel_block_plan, channel_blocks_fit,
                   kernel_layout, launch_plan, merge_tile, state_vectors)
from .replay import REPLAYS_MAX, Recording, slot_key

_GL = {torch.float32: tl.float32, torch.float64: tl.float64}
# Each kernel's pass, the key of launch_counts.
PASSES = {_reduce_kernel: "reduce", _merge_kernel: "merge", _apply_kernel: "apply",
          _persistent_kernel: "persistent"}
# Kernel launches by pass: the tests read it to prove the kernels ran.
launch_counts: collections.Counter = collections.Counter()


def _interpret(kernel, grid, args, meta) -> None:
    patch_interpreter()  # once: triton 3.6's interpreter under numpy >= 2.4
    kernel[grid](*args, **meta)  # no runner: an interpreted call is never replayed


# How kernels on CPU tensors launch: the interpreter. (bench/bench_launch.py --cpu sets
# _bound_launch here, with a no-op for the compiled kernel: a GPU's host path, on a CPU.)
cpu_launch = _interpret


# Why every launch names FMA contraction: triton's default is changing (3.9 warns that 3.10
# turns it off), and the kernels' arithmetic, their instruction counts (the static checks)
# and csrc/'s (nvcc contracts by default) are those of contracted code. Naming it keeps them
# the same on every triton, and keeps 3.9's warning out of users' logs.
# TRITON_FORCE_DISABLE_FP_FUSION=1 still turns it off.
COMPILE_OPTIONS = (("enable_fp_fusion", True),)


def _launch(kernel, grid, *args, **meta):
    """Launches kernel; the runner that launched it (replay.py), or None."""
    launch_counts[PASSES[kernel]] += 1
    meta.update(COMPILE_OPTIONS)  # (a dict of this call's own)
    device = args[0].device
    if device.type != "cuda":
        return cpu_launch(kernel, grid, args, meta)
    if device.index == torch.cuda.current_device():
        return _bound_launch(kernel, grid, args, meta)
    # Triton launches on the current device: make it the tensors' one (cuda:1, say). Not
    # replayed: a replay launches on the current device.
    with torch.cuda.device(device):
        _bound_launch(kernel, grid, args, meta)
    return None


# Why pre-bound launches: kernel[grid](...) (JITFunction.run) binds the arguments, computes
# their specialisation and looks the compiled kernel up on every launch, which costs more
# host time than the rest of a call. The compiled kernel's own runner, compiled[grid],
# takes the arguments as they are. It is kept per (kernel, device, grid, constexprs, and a
# key of the arguments finer than Triton's specialisation: every scalar's value, each
# pointer's dtype and 16-byte alignment), so a kept runner is only ever given arguments
# that Triton would have sent to the same compiled kernel. BOUND_LAUNCH_ENV=0 (read at
# import) turns it off: every launch then goes through kernel[grid](...).
BOUND_LAUNCH_ENV = "BNKERNELS_TRITON_BOUND_LAUNCH"
bound_launches = os.environ.get(BOUND_LAUNCH_ENV, "1") != "0"
_RUNNERS: dict = {}
_RUNNERS_MAX = 4096
_POINTERS: dict = {}  # kernel -> how many leading parameters are pointers (*_ptr)


def _argument_key(kernel, args) -> tuple:
    pointers = _POINTERS.get(kernel)
    if pointers is None:
        pointers = _POINTERS[kernel] = sum(name.endswith("_ptr") for name in kernel.arg_names)
    tensors = args[:pointers]
    bits = 0
    for t in tensors:
        bits |= t.data_ptr()
    # all 16-byte aligned (the usual case, one bool), else each pointer's alignment
    aligned = bits % 16 == 0 or tuple(t.data_ptr() % 16 == 0 for t in tensors)
    return tuple(t.dtype for t in tensors), aligned, args[pointers:]


def _bound_launch(kernel, grid, args, meta):
    """Launches kernel; its runner (None where there is none: bound launches off, or a
    signature _runner can't take)."""
    if not bound_launches:
        kernel[grid](*args, **meta)
        return None
    key = (kernel, args[0].device, grid, tuple(meta.items()), _argument_key(kernel, args))
    runner = _RUNNERS.get(key)
    if runner is not None:
        runner(*args)
        return runner
    compiled = _first_launch(kernel, grid, args, meta)  # launches, through Triton's binder
    runner = _runner(kernel, compiled, grid, len(args), meta)
    if runner is not None:
        keep(_RUNNERS, _RUNNERS_MAX, key, runner)
    return runner


def _first_launch(kernel, grid, args, meta):
    """kernel[grid](*args, **meta): compiles where needed and launches; the compiled kernel."""
    return kernel[grid](*args, **meta)


def _runner(kernel, compiled, grid, positional: int, meta):
    """compiled[grid] as a function of the positional arguments, or None where the kernel's
    signature is not positional arguments then exactly meta's constexprs. The runner takes
    every parameter in signature order, constexprs included, as JITFunction.run passes
    them; its grid has three dimensions."""
    names = list(kernel.arg_names)
    tail = names[positional:]
    if compiled is None or set(tail) != set(meta) - _LAUNCH_OPTIONS:
        return None
    return Runner(compiled[(tuple(grid) + (1, 1))[:3]], tuple(meta[name] for name in tail))


class Runner(NamedTuple):
    """A pre-bound launch: launcher(*args, *constexprs). A replay (replay.py) calls the
    launcher itself, with the constexprs among its recorded constants."""

    launcher: object  # compiled[grid]
    constexprs: tuple

    def __call__(self, *args):
        return self.launcher(*args, *self.constexprs)


# options, not parameters
_LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas"} | {k for k, _ in COMPILE_OPTIONS}


# The element tensors' roles, in the order the kernels take their strides.
_ROLES = ("x", "g", "res", "y", "out", "dres")


class _Shape(NamedTuple):
    """What a launch's shape and strides decide: cached per (device, dtype, shape, each
    role's strides), so that a repeated call plans nothing."""
    n: int
    c: int
    s: int
    acc: torch.dtype
    plan: LaunchPlan
    layout: KernelLayout
    element_strides: Tuple[int, ...]  # every role's (sN, sC, sS), in _ROLES order
    grid: Tuple[int, int]
    base_meta: Tuple[Tuple[str, object], ...]  # the constexprs the layout and plan set
    state_meta: Tuple[Tuple[str, object], ...]  # the forward reduce's own: tile, states
    reduce_meta: Tuple[Tuple[str, object], ...]  # the backward reduce's


_SHAPES: dict = {}
_SHAPES_MAX = 4096  # distinct shapes kept


def _planning() -> tuple:
    """What planning depends on beside the tensors: plan.py's settings and the planners
    themselves (the tests replace them): part of every cache key of plans and replays."""
    return (plan_module.settings(), persistent_plan.settings(), launch_plan, kernel_layout,
            channel_block_plan, channel_blocks_fit, state_vectors)


def _shape_of(x: torch.Tensor, named: dict) -> _Shape:
    key = (x.device, x.dtype, x.shape, tuple((role, t.stride()) for role, t in named.items()),
           _planning())
    shape = _SHAPES.get(key)
    return shape if shape is not None else keep(_SHAPES, _SHAPES_MAX, key,
                                                  _plan_shape(x, named))


def _plan_shape(x: torch.Tensor, named: dict) -> _Shape:
    n, c, s = ncs_shape(x)
    acc = acc_dtype(x.dtype)
    channels_fast = ncs_strides(x)[1] == 1 and c > 1
    tensors = tuple(named.values())
    plan = None
    if not channels_fast and channel_blocks_fit(tensors):
        plan = channel_block_plan(n, c, s, x.device)
    if plan is None:
        plan = launch_plan(n, c, s, channels_fast, x.device)
    layout = kernel_layout(tensors, plan.block_c, plan.block_r, plan.channel_span)
    strides = dict(zip(named, layout.strides))
    element_strides = tuple(v for role in _ROLES for v in strides.get(role, strides["x"]))
    base_meta = (("FLAT_ROWS", layout.flat_rows), ("INDEX_64", layout.index_64),
                 ("CHANNEL_SPAN", plan.channel_span),
                 ("ROW_STEP", 1 if plan.channel_span else plan.block_r),
                 ("S_CONST", 0 if layout.flat_rows or plan.channel_span else s),
                 ("STAGES", plan_module.APPLY_STAGES if acc == torch.float32 else 1),
                 ("SEG_C", plan.seg_c), ("SEG_S", plan.seg_s),
                 ("BLOCK_C", plan.block_c), ("BLOCK_R", plan.block_r), ("ACC", _GL[acc]),
                 ("num_warps", plan.num_warps))
    vec, parts, seg_p = state_vectors(plan, x.element_size(), s, channels_fast,
                                      layout.strides[0][2], layout.flat_rows)
    reduce_rows, reduce_warps = plan.reduce_tile()
    reduce_meta = (("VEC", vec), ("PARTS", parts), ("SEG_P", seg_p),
                   ("STAGES", plan_module.REDUCE_STAGES if acc == torch.float32 else 1),
                   ("num_warps", reduce_warps))
    # the forward's own tile (its states' pooling grows with it); the backward's loads
    # keep the plan's, two tensors a tile
    state_meta = (("BLOCK_R", reduce_rows),
                  ("ROW_STEP", 1 if plan.channel_span else reduce_rows)) + reduce_meta
    return _Shape(n, c, s, acc, plan, layout, element_strides, (plan.c_blocks, plan.splits),
                  base_meta, state_meta, reduce_meta)


class Launch:
    """What the kernels of one call share: shapes, tile, grid, and each element tensor's
    strides by role (_ROLES); x's stand in for a role the call has no tensor for."""

    def __init__(self, x: torch.Tensor, recording: Optional[Recording] = None,
                 **others: Optional[torch.Tensor]):
        named = {"x": x}
        for role, t in others.items():
            if t is not None:
                named[role] = t
        shape = _shape_of(x, named)
        self.n, self.c, self.s, self.acc = shape.n, shape.c, shape.s, shape.acc
        self.rows = self.n * self.s  # a channel's values
        self.plan, self.layout, self.grid = shape.plan, shape.layout, shape.grid
        # the kernels' R: rows, or (channel blocks) samples; a split's values, for the merge
        blocks = self.plan.channel_span > 0
        self.loop_rows = self.n if blocks else self.rows
        self.split_values = self.plan.rows_per_split * (self.s if blocks else 1)
        self.element_strides = shape.element_strides
        self._base_meta = shape.base_meta
        self._reduce_meta = (shape.reduce_meta, shape.state_meta)  # backward, forward
        self.x = x
        self.tensors = named
        self.recording = recording

    def launch(self, kernel, grid, *args, **meta) -> None:
        runner = _launch(kernel, grid, *args, **meta)
        if self.recording is not None:
            self.recording.launch(PASSES[kernel], runner, args)

    def scratch(self, shape: Tuple[int, ...]) -> torch.Tensor:
        """A temporary of the accumulation dtype (recorded: a replay allocates its own)."""
        t = torch.empty(shape, dtype=self.acc, device=self.x.device)
        self._record_scratch(t, shape)
        return t

    def _record_scratch(self, t: torch.Tensor, shape: Tuple[int, ...]) -> None:
        """t, a temporary of shape (the accumulation dtype), recorded: a replay allocates
        its own."""
        acc, device = self.acc, self.x.device
        if self.recording is not None:
            self.recording.temporary(t, lambda _slots: torch.empty(shape, dtype=acc,
                                                                   device=device))

    def pointer(self, role: str) -> torch.Tensor:
        """The role's tensor, or x where the call has none (the kernel's constexpr
        switches leave that pointer unread)."""
        return self.tensors.get(role, self.x)

    def meta(self, activation: int, weight, bias, **switches):
        tensors = self.tensors
        return dict(self._base_meta, ACTIVATION=activation, HAS_RESIDUAL="res" in tensors,
                    MASK_FROM_Y="y" in tensors, HAS_WEIGHT=weight is not None,
                    HAS_BIAS=bias is not None, **switches)

    def reduce(self, eps: float, outs: Tuple[torch.Tensor, ...],
               stats: Optional[Normalizer] = None, weight=None, bias=None, activation: int = 0,
               update: Optional[RunningUpdate] = None,
               rounded: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)):
        """The reduce and merge passes, into outs: (mean, rstd, var) of x (stats None), or
        (sum g, sum g*xhat) of g with x normalized by stats. outs: (C,) dense, acc dtype.
        update: the running statistics, updated by the launch that finishes the statistics.
        rounded (backward): GradSums' (bias_grad, weight_grad), written by that launch too.
        One split (a program holds whole channels): the reduce kernel finishes them itself,
        and there is no merge launch."""
        backward = stats is not None
        x, plan = self.x, self.plan
        final = plan.splits == 1
        # the reduce kernel's partials; with one split it writes outs instead
        part = x if final else self.scratch((2 if backward else 4, plan.splits, self.c))
        out2 = outs[2] if len(outs) == 3 else outs[0]  # the backward has no third output
        running = _running_args(update, x)
        dbias, dweight = rounded
        grads = (_or_x(dbias, x), _or_x(dweight, x))  # (dense: C elements, stride 1)
        switches = dict(running.switches, HAS_DBIAS=dbias is not None,
                        HAS_DWEIGHT=dweight is not None)
        mean, spread = (stats.mean, _spread_of(stats)) if backward else (None, None)
        reduce_roles = ("x", "g", "res", "y")  # the reduce kernel reads no output
        self.launch(_reduce_kernel, self.grid, *(self.pointer(r) for r in reduce_roles),
                _or_x(mean, x), _or_x(spread, x), _or_x(weight, x), _or_x(bias, x), part,
                outs[0], outs[1], out2, *grads, *running.pointers,
                self.c, self.s, self.loop_rows, plan.rows_per_split, eps, *running.momentum,
                *self.element_strides[:3 * len(reduce_roles)],
                *_channel_strides(mean, spread, weight, bias), *running.strides,
                **self.meta(activation, weight, bias, BACKWARD=backward,
                            FROM_VAR=backward and stats.var is not None, FINAL=final,
                            **dict(self._reduce_meta[not backward]), **switches))
        if final:
            return
        block_c, block_s, warps = merge_tile(self.c, plan.splits)
        self.launch(_merge_kernel, (triton.cdiv(self.c, block_c),), part, outs[0], outs[1],
                    out2, *grads, *running.pointers, self.c, self.rows, self.split_values,
                    plan.splits, eps, *running.momentum, *running.strides, BACKWARD=backward,
                    BLOCK_C=block_c, BLOCK_S=block_s, ACC=_GL[self.acc], num_warps=warps,
                    **switches)

    def apply(self, eps: float, stats: Normalizer, weight, bias, *, backward: bool,
              batch_stats: bool = False, activation: int = 0, sums=None, count=None,
              num_batches_tracked: Optional[torch.Tensor] = None):
        """The apply pass: y = act(bn(x) (+ res)), or dx (and dres) from g; sums and count:
        the three-path dx's (sum g, sum g*xhat) and the values they are over (an int, or a
        (C,) tensor)."""
        x = self.x
        per_channel = isinstance(count, torch.Tensor)
        sum_g, sum_gx = (x, x) if sums is None else (sums[0].contiguous(),
                                                    sums[1].contiguous())  # read densely
        self.launch(_apply_kernel, self.grid, *(self.pointer(r) for r in _ROLES),
                stats.mean, _spread_of(stats), _or_x(weight, x), _or_x(bias, x), sum_g, sum_gx,
                count.contiguous() if per_channel else x, _or_x(num_batches_tracked, x),
                self.c, self.s, self.loop_rows, self.plan.rows_per_split, eps,
                1 if per_channel or count is None else count,
                *self.element_strides,
                *_channel_strides(stats.mean, _spread_of(stats), weight, bias),
                **self.meta(activation, weight, bias, BACKWARD=backward,
                            BATCH_STATS=batch_stats, FROM_VAR=stats.var is not None,
                            COUNT_PER_CHANNEL=per_channel,
                            COUNT_BATCH=num_batches_tracked is not None,
                            HAS_DRES="dres" in self.tensors))

    def persistent(self, eps: float, outs: Tuple[torch.Tensor, ...], weight, bias,
                   activation: int, stats: Optional[Normalizer] = None,
                   update: Optional[RunningUpdate] = None,
                   rounded: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)
                   ) -> bool:
        """A training pass as one launch of persistent.py's kernel, where persistent_plan
        allows it: the forward (stats None: outs = mean, rstd, var; y into the "out"
        role) or the backward through the batch statistics (outs = sum g, sum g*xhat;
        dx into "out", dres where given). False where it does not: nothing launched."""
        backward = stats is not None
        x, plan = self.x, self.plan
        # the bytes the reduce reads and the apply reads again: x forward; x, g and the
        # epilogue's residual or y backward
        read = sum(role in self.tensors for role in ("x", "g", "res", "y")) if backward else 1
        twice = x.numel() * x.element_size() * read
        if not persistent_plan.allowed(x.device, plan.splits, twice):
            return False
        programs = plan.c_blocks * plan.splits
        merge_c, merge_s = persistent_plan.merge_tile(self.c, programs, plan.splits)
        running = _running_args(update, x)
        dbias, dweight = rounded
        mean, spread = (stats.mean, _spread_of(stats)) if backward else (x, x)
        state = persistent_plan.barrier_state(x.device)
        interpreted = x.device.type != "cuda"
        reduce_meta = dict(self._reduce_meta[not backward])  # (name, value) pairs
        base = dict(self._base_meta)
        meta = dict(self.meta(activation, weight, bias, BACKWARD=backward,
                              FROM_VAR=backward and stats.var is not None,
                              HAS_DBIAS=dbias is not None, HAS_DWEIGHT=dweight is not None,
                              HAS_DRES="dres" in self.tensors,
                              COUNT_BATCH=update is not None and
                              update.num_batches_tracked is not None, **running.switches),
                    SPIN_LIMIT=persistent_plan.SPIN_LIMIT,
                    TRAP=not interpreted or persistent_plan.TRAP_ON_CPU,
                    MERGE_C=merge_c, MERGE_S=merge_s, VEC=reduce_meta["VEC"],
                    PARTS=reduce_meta["PARTS"], SEG_P=reduce_meta["SEG_P"],
                    REDUCE_STAGES=reduce_meta["STAGES"],
                    REDUCE_BLOCK_R=reduce_meta.get("BLOCK_R", base["BLOCK_R"]),
                    REDUCE_ROW_STEP=reduce_meta.get("ROW_STEP", base["ROW_STEP"]),
                    # the reduce's warps: its tile is 128-bit vectors a thread at that
                    # count (channels_last's half tile at 8 warps would take 64 bits); the
                    # apply's full tile then takes two vectors a thread
                    num_warps=reduce_meta["num_warps"])
        part_shape = (2 if backward else 4, plan.splits, self.c)
        part = torch.empty(part_shape, dtype=self.acc, device=x.device)  # recorded below
        args = (*(self.pointer(r) for r in _ROLES), mean, spread, _or_x(weight, x),
                _or_x(bias, x), part, outs[0], outs[1], outs[2] if len(outs) == 3 else outs[0],
                _or_x(dbias, x), _or_x(dweight, x), *running.pointers, state,
                self.c, self.s, self.loop_rows, plan.rows_per_split, eps, *running.momentum,
                self.rows, *self.element_strides,
                *_channel_strides(stats and stats.mean, stats and spread, weight, bias),
                *running.strides)
        if not interpreted:
            key = (x.device, tuple(meta.items()), _argument_key(_persistent_kernel, args))
            resident = persistent_plan.resident_programs(_persistent_kernel, x.device, args,
                                                         dict(meta, PHASE=0), key)
            if programs > resident:
                return False
        self._record_scratch(part, part_shape)
        if interpreted and persistent_plan.INTERPRETER_PHASES:
            for phase in (1, 2, 3):
                self.launch(_persistent_kernel, self.grid, *args, PHASE=phase, **meta)
            return True
        self.launch(_persistent_kernel, self.grid, *args, PHASE=0, **meta)
        error = persistent_plan.failed(state)
        if error is not None:
            raise RuntimeError(error)
        return True


class _RunningArgs(NamedTuple):
    """A RunningUpdate as the reduce and merge kernels' arguments."""
    pointers: Tuple[torch.Tensor, ...]  # running mean, running var, num_batches_tracked
    momentum: Tuple[float, float]  # hi + lo: float32 arguments that carry a float64 value
    strides: Tuple[int, int]
    switches: dict


def _running_args(update: Optional[RunningUpdate], x: torch.Tensor) -> _RunningArgs:
    if update is None:
        return _RunningArgs((x, x, x), (0.0, 0.0), (0, 0),
                            dict(UPDATE_RUNNING=False, CUMULATIVE=False))
    nbt = update.num_batches_tracked
    return _RunningArgs((update.mean, update.var, x if nbt is None else nbt),
                        _split_momentum(update.momentum or 0.0),
                        (update.mean.stride(0), update.var.stride(0)),
                        dict(UPDATE_RUNNING=True, CUMULATIVE=update.momentum is None))


@functools.lru_cache(maxsize=64)
def _split_momentum(momentum: float) -> Tuple[float, float]:
    hi = struct.unpack("f", struct.pack("f", momentum))[0]
    return hi, momentum - hi


def _spread_of(stats: Normalizer) -> torch.Tensor:
    """The tensor the kernels' rstd_or_var pointer reads."""
    return stats.rstd if stats.rstd is not None else stats.var


def _channel_strides(*vectors: Optional[torch.Tensor]) -> Tuple[int, ...]:
    """The stride of each (C,) vector (0 for a missing one, which the kernel doesn't read):
    views are read in place, an expanded one through its stride 0."""
    return tuple(0 if t is None else t.stride(0) for t in vectors)


def _or_x(t: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A pointer argument the kernel's constexpr switches leave unread: any tensor will do."""
    return x if t is None else t


# Replays (replay.py), by call signature: a Replay, or None for a signature that is planned
# every time.
_REPLAYS: dict = {}


def _replay_key(slots: tuple, scalars: tuple):
    """The signature of a call (replay.py), or None where it is not to be recorded:
    misaligned pointers (the runners were bound for aligned ones), or a device that
    _launch must make current (a replay would not)."""
    tensors, aligned = slot_key(slots)
    x = slots[0]
    if not aligned or (x.device.type == "cuda" and
                       x.device.index != torch.cuda.current_device()):
        return None
    return (x.shape, x.device, scalars, tensors, cpu_launch, bound_launches, _planning(),
            persistent_plan.context_key(x.device))


def _replay_or_plan(call, slots: tuple, scalars: tuple, plan) -> None:
    """The call's replay where it has one; else plan(call, recording) launches it, recorded
    for the next call of its signature where it can be."""
    key = _replay_key(slots, scalars)
    replay = _REPLAYS.get(key, _REPLAYS) if key is not None else None  # _REPLAYS: new
    if replay is not None and replay is not _REPLAYS:
        replay.run(slots, launch_counts)
        return
    recording = Recording(slots) if replay is _REPLAYS else None
    plan(call, recording)
    if recording is not None:
        keep(_REPLAYS, REPLAYS_MAX, key, recording.replay())


def _replayer(slots: tuple, scalars: tuple):
    """A contract.Replayer of the call whose slots and scalars these are, after it ran;
    None where it has no replay. It refuses (False) once the launch hooks in its key have
    changed (or the planning: _planning), or (CUDA) on another current device than x's."""
    key = _replay_key(slots, scalars)
    replay = _REPLAYS.get(key) if key is not None else None
    if replay is None:
        return None
    # the hooks in the key, and the store itself (a new one, as the tests make, is a new
    # beginning)
    hooks, run, replays = key[4:], replay.run, _REPLAYS
    device = slots[0].device

    def replayer(call_slots: tuple) -> bool:
        if (cpu_launch, bound_launches, _planning(),
                persistent_plan.context_key(device)) != hooks or replays is not _REPLAYS or (
                device.type == "cuda" and device.index != torch.cuda.current_device()):
            return False
        run(call_slots, launch_counts)
        return True
    return replayer


def _forward_scalars(call: ForwardCall) -> tuple:
    update = call.update
    return call.eps, call.activation, None if update is None else (update.momentum,)


def _backward_scalars(call: BackwardCall) -> tuple:
    return call.eps, call.activation, call.through_batch_stats


def forward(call: ForwardCall) -> None:
    # every tensor the planner reads, x first (the signature's slots), and its scalars
    _replay_or_plan(call, forward_slots(call), _forward_scalars(call), _plan_forward)


def forward_replayer(call: ForwardCall):
    return _replayer(forward_slots(call), _forward_scalars(call))


def _plan_forward(call: ForwardCall, recording: Optional[Recording]) -> None:
    launch = Launch(call.x, recording, out=call.y, res=call.residual)
    if call.batch is not None and call.y is not None and launch.persistent(
            call.eps, (call.batch.mean, call.batch.rstd, call.batch.var), call.weight,
            call.bias, code(call.activation), update=call.update):
        return
    if call.batch is not None:
        batch = call.batch
        launch.reduce(call.eps, (batch.mean, batch.rstd, batch.var), update=call.update)
        stats = Normalizer(mean=batch.mean, rstd=batch.rstd)
    else:
        stats = call.running
    if call.y is not None:
        launch.apply(call.eps, stats, call.weight, call.bias, backward=False,
                     activation=code(call.activation),
                     num_batches_tracked=call.update and call.update.num_batches_tracked)


def backward(call: BackwardCall) -> None:
    _replay_or_plan(call, backward_slots(call), _backward_scalars(call), _plan_backward)


def backward_replayer(call: BackwardCall):
    return _replayer(backward_slots(call), _backward_scalars(call))


def _plan_backward(call: BackwardCall, recording: Optional[Recording]) -> None:
    act = code(call.activation)
    dx = call.dx
    if dx is None and call.dres is not None:  # the apply kernel writes dx wherever it runs
        dx = torch.empty_like(call.x)
        if recording is not None:
            recording.temporary(dx, lambda slots: torch.empty_like(slots[0]))
    launch = Launch(call.x, recording, g=call.grad_y, res=call.residual, y=call.output,
                    out=dx, dres=call.dres)
    sums, count = None, None
    if call.sums is not None or (call.through_batch_stats and call.given_sums is None):
        own = call.sums or GradSums(launch.scratch((launch.c,)), launch.scratch((launch.c,)))
        if (dx is not None and call.through_batch_stats and call.given_sums is None
                and launch.persistent(call.eps, (own.sum_g, own.sum_gx), call.weight,
                                      call.bias, act, stats=call.stats,
                                      rounded=(own.bias_grad, own.weight_grad))):
            return
        launch.reduce(call.eps, (own.sum_g, own.sum_gx), call.stats, call.weight, call.bias,
                      act, rounded=(own.bias_grad, own.weight_grad))
        sums, count = (own.sum_g, own.sum_gx), launch.rows
    if call.given_sums is not None:
        sums, count = (call.given_sums.sum_g, call.given_sums.sum_gx), call.given_count
    if dx is not None:
        launch.apply(call.eps, call.stats, call.weight, call.bias, backward=True,
                     batch_stats=call.through_batch_stats, activation=act, sums=sums,
                     count=count)
