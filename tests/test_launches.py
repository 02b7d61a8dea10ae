"""Device work and host work per call: what issue "launches and host time" asks of a
training step, held so that it cannot creep back up.

Device work is counted on CPU: the kernels' launches (each backend's launch counter) plus
every leaf aten op that computes (torch.profiler), for one bnkernels.BatchNorm2d training
forward, its backward, and an eval forward. Targets per BN: forward <= 3 (the running
statistics and num_batches_tracked updated in the kernels), backward <= 3, eval 1.
Torch's own module, on a GPU: 2, 1 and 1.
"""
import collections

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import bnkernels
from bnkernels import backends
from bnkernels.backends.triton import launch as triton_launch
from helpers import bn_pair, bound_launches_on_cpu, launches, make_input

# Leaf aten ops that allocate, alias or only look: no device work.
_NO_WORK = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::detach",
            "aten::view", "aten::as_strided", "aten::alias", "aten::to", "aten::lift_fresh",
            "aten::resolve_conj", "aten::resolve_neg", "aten::_reshape_alias", "aten::reshape",
            "aten::expand", "aten::t", "aten::unbind", "aten::select", "aten::slice"}

# (shape, whether the Triton plan splits a channel over programs: a merge launch)
SHAPES = [((4, 6, 5, 7), False), ((8, 2, 64, 64), True)]


def _leaf_ops(prof) -> collections.Counter:
    ops = collections.Counter()
    for event in prof.events():
        if not event.name.startswith("aten::") or event.name in _NO_WORK:
            continue
        if not any(c.name.startswith("aten::") for c in event.cpu_children):
            ops[event.name] += 1
    return ops


def _device_work(backend, fn):
    """(launches by pass, the aten ops that compute) of fn()."""
    before = collections.Counter(launches(backend))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    launched = collections.Counter(launches(backend))
    launched.subtract(before)
    return +launched, _leaf_ops(prof)


@pytest.fixture
def stub_triton_kernels(monkeypatch):
    """The Triton launches counted, not run (the interpreter's own numpy work would show up
    as torch ops; what the kernels compute is every other test's business)."""
    monkeypatch.setattr(triton_launch, "cpu_launch", lambda kernel, grid, args, meta: None)


@pytest.mark.parametrize("shape,splits", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_device_work_per_training_step_triton(shape, splits, momentum, monkeypatch,
                                              stub_triton_kernels):
    monkeypatch.setenv("BNKERNELS_BACKEND", "triton")
    bn = bnkernels.BatchNorm2d(shape[1], momentum=momentum)
    x = make_input(shape, torch.float32, "cpu").requires_grad_(True)
    out = {}
    fwd_launches, fwd_ops = _device_work("triton", lambda: out.setdefault("y", bn(x)))
    assert not fwd_ops, f"forward: torch ops beside the kernels: {dict(fwd_ops)}"
    expected = {"reduce": 1, "apply": 1, **({"merge": 1} if splits else {})}
    assert dict(fwd_launches) == expected
    grad = torch.randn_like(x)
    bwd_launches, bwd_ops = _device_work("triton", lambda: out["y"].backward(grad))
    assert not bwd_ops, f"backward: torch ops beside the kernels: {dict(bwd_ops)}"
    assert dict(bwd_launches) == expected
    bn.eval()
    with torch.no_grad():
        eval_launches, eval_ops = _device_work("triton", lambda: bn(x))
    assert dict(eval_launches) == {"apply": 1} and not eval_ops


@pytest.mark.parametrize("shape,splits", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_get_gradients_with_no_cast(shape, splits, dtype, monkeypatch,
                                                              stub_triton_kernels):
    """A .half() / .bfloat16() model: the launch that finishes the sums writes the weight
    and bias gradients in their dtype too (no cast op after the backward)."""
    monkeypatch.setenv("BNKERNELS_BACKEND", "triton")
    bn = bnkernels.BatchNorm2d(shape[1]).to(dtype)
    x = make_input(shape, dtype, "cpu").requires_grad_(True)
    y = bn(x)
    grad = torch.randn_like(x)
    bwd_launches, bwd_ops = _device_work("triton", lambda: y.backward(grad))
    assert not bwd_ops, f"backward: torch ops beside the kernels: {dict(bwd_ops)}"
    assert dict(bwd_launches) == {"reduce": 1, "apply": 1, **({"merge": 1} if splits else {})}
    assert bn.weight.grad.dtype == bn.bias.grad.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_half_precision_parameter_gradients_are_the_sums_rounded(kernel_backend, dtype,
                                                                 activation):
    """What the kernels write for them is bitwise the op's float32 sums rounded by torch."""
    for shape, _ in SHAPES:
        torch.manual_seed(0)
        c = shape[1]
        x = make_input(shape, dtype, "cpu")
        w = (torch.rand(c) + 0.5).to(dtype).requires_grad_(True)
        b = torch.randn(c).to(dtype).requires_grad_(True)
        g = torch.randn(shape).to(dtype)
        leaf = x.clone().requires_grad_(True)
        bnkernels.batch_norm(leaf, None, None, w, b, True, activation=activation).backward(g)
        y, mean, rstd, _ = torch.ops.bnkernels.batch_norm_fwd(x, w, b, None, None, True, 1e-5,
                                                              activation, None)
        dx, sum_g, sum_gx, _ = torch.ops.bnkernels.batch_norm_bwd(
            g, x, w, b, None, y if activation else None, mean, rstd, None, 1e-5, activation,
            True, True, False)
        assert torch.equal(w.grad, sum_gx.to(dtype)) and torch.equal(b.grad, sum_g.to(dtype))
        assert torch.equal(leaf.grad, dx)


def test_device_work_per_training_step_cuda_backend(kernel_backend_cuda):
    """csrc/ keeps the same discipline: one fused launch (or reduce, merge, apply) forward,
    the running statistics and num_batches_tracked updated in the kernels; half-precision
    parameters' gradients written by the kernels too."""
    for (shape, _), dtype in zip(SHAPES * 2, [torch.float32] * 2 + [torch.bfloat16] * 2):
        bn = bnkernels.BatchNorm2d(shape[1]).to(dtype)
        x = make_input(shape, dtype, "cpu").requires_grad_(True)
        out = {}
        fwd_launches, fwd_ops = _device_work("cuda", lambda: out.setdefault("y", bn(x)))
        assert not fwd_ops and 1 <= sum(fwd_launches.values()) <= 3, (fwd_launches, fwd_ops)
        grad = torch.randn_like(x)
        bwd_launches, bwd_ops = _device_work("cuda", lambda: out["y"].backward(grad))
        assert not bwd_ops and 1 <= sum(bwd_launches.values()) <= 3, (bwd_launches, bwd_ops)
        assert bn.num_batches_tracked.item() == 1


@pytest.fixture
def kernel_backend_cuda(monkeypatch):
    from conftest import cuda_toolkit_missing
    if cuda_toolkit_missing():
        pytest.skip("no CUDA toolkit to build csrc/ with")
    monkeypatch.setenv("BNKERNELS_BACKEND", "cuda")
    monkeypatch.setenv("BNKERNELS_CUDA_EMULATE", "1")


@pytest.mark.parametrize("momentum", [0.1, None, 1.0])
@pytest.mark.parametrize("shape", [s for s, _ in SHAPES])
@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.bfloat16])
def test_running_statistics_updated_in_the_kernels_match_torch(momentum, shape, buffer_dtype,
                                                               kernel_backend, device):
    """Over several steps, with and without a merge launch, a momentum and a cumulative
    average (momentum None), float32 and bfloat16 buffers: torch's numbers."""
    dtype = buffer_dtype
    ref, ours = bn_pair(4, shape[1], dtype, device, momentum=momentum)
    for step in range(3):
        x = make_input(shape, dtype, device, loc=step + 0.5, scale=1.5, seed=step)
        ours(x), ref(x)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, **tol)
    torch.testing.assert_close(ours.running_var, ref.running_var, **tol)


def test_strided_running_statistics_are_updated_in_place(kernel_backend, device):
    """Running buffers that are strided views (a column of a bigger tensor) are read and
    written through their stride, and nothing else of the base moves."""
    c = 5
    base_mean, base_var = torch.zeros(c, 3, device=device), torch.ones(c, 3, device=device)
    rm, rv = base_mean[:, 1], base_var[:, 1]
    ref_m, ref_v = torch.zeros(c, device=device), torch.ones(c, device=device)
    x = make_input((4, c, 6, 7), torch.float32, device, loc=1.0, scale=2.0)
    bnkernels.batch_norm(x, rm, rv, training=True, momentum=0.3)
    torch.nn.functional.batch_norm(x, ref_m, ref_v, training=True, momentum=0.3)
    torch.testing.assert_close(rm, ref_m)
    torch.testing.assert_close(rv, ref_v)
    assert base_mean[:, 0].eq(0).all() and base_var[:, 2].eq(1).all()


def test_running_statistics_version_counters_move(device):
    """Written by kernels, not by torch ops: the version counters still move, so autograd
    refuses a backward through a running statistic that a later step changed."""
    bn = bnkernels.BatchNorm2d(3).to(device)
    before = [t._version for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    bn(make_input((2, 3, 4, 4), torch.float32, device))
    after = [t._version for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    assert all(a > b for a, b in zip(after, before))


def test_no_statistics_gradients_are_materialised(device):
    """The statistics get no gradient, no zero-filled tensors: on the direct route they are
    not outputs of the Function at all; on the other (BatchNormFunction, which returns
    them) autograd passes None for them."""
    from bnkernels import autograd as bn_autograd
    x = make_input((2, 3, 4, 4), torch.float32, device).requires_grad_(True)
    y = bnkernels.batch_norm(x, None, None, training=True)
    assert type(y.grad_fn).__name__ == "DirectBatchNormFunctionBackward"
    assert y.grad_fn.apply(torch.ones_like(y))[0] is not None  # one output: one gradient in
    seen = []
    real = bn_autograd.BatchNormFunction.backward

    def spy(ctx, grad_y, *stat_grads):
        seen.append(stat_grads)
        return real(ctx, grad_y, *stat_grads)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bn_autograd.BatchNormFunction, "backward", staticmethod(spy))
        mp.setattr(bn_autograd, "direct", lambda *tensors: False)
        bnkernels.batch_norm(x, None, None, training=True).sum().backward()
    assert seen == [(None, None, None)]


# ------------------------------------------------------------------------- host path


def test_backend_choice_is_cached_and_follows_the_environment(monkeypatch):
    x = torch.randn(2, 3)
    monkeypatch.setattr(backends, "_SELECTED", {})
    monkeypatch.setenv("BNKERNELS_BACKEND", "torch")
    assert backends.select(x).name == "torch"
    calls = []
    real = backends._select
    monkeypatch.setattr(backends, "_select", lambda t: calls.append(1) or real(t))
    for _ in range(3):
        assert backends.select(x).name == "torch"
    assert calls == []  # decided once per environment, not per call
    monkeypatch.setenv("BNKERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.select(x).name == "triton" and calls == [1]


def test_launch_plan_is_computed_once_per_shape(monkeypatch):
    calls = []
    real = triton_launch._plan_shape
    monkeypatch.setattr(triton_launch, "_plan_shape", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, 5, 7, 9)
    for _ in range(3):
        triton_launch.Launch(x, out=torch.empty_like(x))
    assert len(calls) <= 1  # 0: planned by an earlier test already
    other = torch.randn(3, 5, 7, 4)
    triton_launch.Launch(other, out=torch.empty_like(other))
    assert len(calls) <= 2


class _FakeCompiled:
    """A compiled kernel: records what its runner is given."""

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append((grid, args))


class _FakeKernel:
    arg_names = ["a_ptr", "b_ptr", "n", "eps", "BLOCK", "FLAG"]

    def __init__(self):
        self.binds, self.log = 0, []

    def __getitem__(self, grid):
        def bind_and_launch(*args, **meta):
            self.binds += 1
            return _FakeCompiled(self.log)
        return bind_and_launch


def test_pre_bound_launch_binds_once_and_passes_every_parameter_in_order():
    kernel = _FakeKernel()
    a, b = torch.zeros(64), torch.zeros(64)
    meta = dict(BLOCK=128, FLAG=True, num_warps=4)
    for _ in range(3):
        triton_launch._bound_launch(kernel, (5, 2), (a, b, 64, 1e-5), meta)
    assert kernel.binds == 1  # the first launch goes through Triton's binder
    # the later ones through the runner: every parameter, constexprs too, a 3-D grid
    assert kernel.log == [((5, 2, 1), (a, b, 64, 1e-5, 128, True))] * 2


def test_pre_bound_launch_rebinds_where_triton_would_specialise_differently():
    kernel = _FakeKernel()
    meta = dict(BLOCK=128, FLAG=True, num_warps=4)
    base = torch.zeros(80)
    a, b = base[:64], base[:64]
    triton_launch._bound_launch(kernel, (5,), (a, b, 64, 1e-5), meta)
    triton_launch._bound_launch(kernel, (5,), (base[1:65], b, 64, 1e-5), meta)  # misaligned
    triton_launch._bound_launch(kernel, (5,), (a, b, 1, 1e-5), meta)  # an int of 1
    triton_launch._bound_launch(kernel, (5,), (a.double(), b, 64, 1e-5), meta)  # a dtype
    triton_launch._bound_launch(kernel, (5,), (a, b, 64, 1e-5), dict(meta, FLAG=False))
    assert kernel.binds == 5 and kernel.log == []


def test_bench_launch_cpu_runs_the_gpu_host_path(tmp_path):
    """bench_launch.py --cpu: CPU tensors take the pre-bound launch path, the driver call a
    no-op, beside torch; the CSV has every (op, shape, provider)."""
    import subprocess
    import sys
    from pathlib import Path
    bench = Path(__file__).resolve().parents[1] / "bench" / "bench_launch.py"
    done = subprocess.run([sys.executable, str(bench), "--cpu", "--calls", "30", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = (tmp_path / "launch.csv").read_text().splitlines()
    assert len(rows) == 1 + 16 and "no-op GPU launch" in rows[1]


# ------------------------------------------------------------------------- replayed calls

def _training_run(make_module, inputs, channels_last, fused):
    """Each input through a fresh module's training step (forward, backward) and then an
    eval forward: everything each step gave, and the buffers at the end."""
    torch.manual_seed(0)
    bn = make_module()
    seen = []
    for x in inputs:
        x = x.to(memory_format=torch.channels_last) if channels_last else x
        x = x.detach().requires_grad_(True)
        if fused:
            residual = torch.randn_like(x).requires_grad_(True)
            y = bnkernels.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                     True, 0.1, bn.eps, activation="relu", residual=residual)
        else:
            residual = None
            y = bn(x)
        y.backward(torch.sin(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
        seen += [y, x.grad, bn.weight.grad, bn.bias.grad]
        seen += [residual.grad] if fused else []
        bn.weight.grad = bn.bias.grad = None
    bn.eval()
    with torch.no_grad():
        seen.append(bn(inputs[0]))
    return seen + [bn.running_mean, bn.running_var, bn.num_batches_tracked]


# (shape, channels_last, momentum, fused): one split and several (a merge, its temporary)
REPLAY_CASES = [((4, 6, 5, 7), False, 0.1, False), ((8, 6, 32, 32), True, None, False),
                ((4, 6, 5, 7), False, 0.1, True), ((8, 6, 32, 32), True, 0.1, True)]


@pytest.mark.parametrize("shape,channels_last,momentum,fused", REPLAY_CASES)
def test_replayed_calls_compute_bitwise_what_planned_calls_compute(
        shape, channels_last, momentum, fused, monkeypatch):
    """Training steps and eval forwards whose launches are replayed (every call after the
    first of its signature) give bitwise the results of calls planned every time (the
    interpreter's own path), buffers included, on new tensors each call."""
    monkeypatch.setenv("BNKERNELS_BACKEND", "triton")
    inputs = [make_input(shape, torch.float32, "cpu", seed=i) for i in range(3)]

    def make_module():
        return bnkernels.BatchNorm2d(shape[1], momentum=momentum)

    planned = _training_run(make_module, inputs, channels_last, fused)
    with pytest.MonkeyPatch.context() as mp:
        ran = bound_launches_on_cpu(mp)
        before = collections.Counter(triton_launch.launch_counts)
        replayed = _training_run(make_module, inputs, channels_last, fused)
        counted = collections.Counter(triton_launch.launch_counts)
        counted.subtract(before)
    merges = any(name == "merge" for r in ran for name, _, _ in r.launches)
    assert merges == (shape == (8, 6, 32, 32))  # several splits: the merge was replayed
    # every training forward and backward after its signature's first (the eval one is a first)
    assert len(ran) == 2 * (len(inputs) - 1)
    assert counted["reduce"] > 0 and counted["apply"] > 0  # replays count their launches
    for a, b in zip(planned, replayed):
        assert a is None and b is None or torch.equal(a, b)


def test_misaligned_calls_are_planned_every_time_and_stay_exact(monkeypatch):
    """A call whose tensors are not all 16-byte aligned (a view at an odd offset) is never
    replayed: the runners were bound for aligned pointers."""
    monkeypatch.setenv("BNKERNELS_BACKEND", "triton")
    base = make_input((4 * 6 * 5 * 7 + 1,), torch.float32, "cpu")
    x = base[1:].view(4, 6, 5, 7)  # 4 bytes past an aligned start
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    planned = [bnkernels.batch_norm(x, None, None, w, b, True) for _ in range(2)]
    with pytest.MonkeyPatch.context() as mp:
        ran = bound_launches_on_cpu(mp)
        bound = [bnkernels.batch_norm(x, None, None, w, b, True) for _ in range(3)]
    assert ran == []
    assert all(torch.equal(planned[0], y) for y in planned[1:] + bound)


def test_a_recording_that_cannot_be_rebuilt_is_not_replayed():
    """A launch argument that is none of the call's tensors (a copy the planner made), a
    tensor filling two slots, or a launch with no runner: no replay, planned every time."""
    from bnkernels.backends.triton.replay import Recording
    a, b = torch.zeros(4), torch.zeros(4)
    runner = lambda *args: None  # noqa: E731
    ok = Recording((a, b))
    ok.launch("apply", runner, (a, b, 4, 1e-5))
    assert ok.replay() is not None
    foreign = Recording((a, b))
    foreign.launch("apply", runner, (a, b.clone(), 4))
    two_slots = Recording((a, a))
    two_slots.launch("apply", runner, (a, 4))
    unbound = Recording((a, b))
    unbound.launch("apply", None, (a, b, 4))
    assert foreign.replay() is None and two_slots.replay() is None and unbound.replay() is None


def test_nchw_tiles_are_fitted_to_the_rows(monkeypatch):
    """An NCHW tile shortens (the tile holding more channels instead) where that costs the
    forward reduction less: fewer padded rows, and fewer tiles past the last whole group
    of GROUP_TILES (taken one at a time). 128 x 7 x 7 = 6272 rows: 128-row tiles (49: 12
    groups and 1 alone, 98% of the lanes active), not 2048-row ones (4 tiles, none in a
    group, 77%); 32 x 7 x 7 = 1568: 13 tiles of 128 (3 groups), not 7 of 256 (3 alone);
    no shorter than MIN_FITTED_ROWS."""
    from bnkernels.backends.triton import plan as triton_plan
    monkeypatch.setattr(triton_plan, "INTERPRETER_TILE", triton_plan.GPU_TILE)
    tiles = triton_plan.launch_plan(128, 2048, 49, False, torch.device("cpu"))
    assert (tiles.block_r, tiles.block_c) == (128, 16)
    assert triton_plan.launch_plan(32, 2048, 49, False, torch.device("cpu")).block_r == 128
    # 100352 rows: 196 tiles of 512, all in groups, against 49 of 2048 with one alone
    assert triton_plan.launch_plan(32, 64, 3136, False, torch.device("cpu")).block_r == 512
    assert triton_plan.launch_plan(128, 64, 12544, False, torch.device("cpu")).block_r == 2048
    assert triton_plan.launch_plan(2, 8, 3, False, torch.device("cpu")).block_r == 8
