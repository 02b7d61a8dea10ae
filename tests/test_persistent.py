"""The persistent training pass (backends/triton/persistent.py): one launch per pass on a
GPU, the same arithmetic as the three-kernel path.

On CPU the interpreter runs the kernel's phases as three launches (persistent_plan's
INTERPRETER_PHASES); every result is then bitwise the three kernels' (same partials, same
merge order, same apply). On a GPU the kernel is one launch through its grid barriers,
and its apply runs at the reduce's warps, so it is compared with the float64 reference
and, for reproducibility, with itself. The barrier's timeout runs through the
interpreter too: there, with phases off, the first program waits for programs that never
start.
"""
import collections

import pytest
import torch

import bnkernels
from bnkernels.backends.triton import launch as triton_launch
from bnkernels.backends.triton import persistent_plan
from helpers import GRAD_TOL, TOL, assert_close_scaled, float64_reference, make_input

ON_GPU = torch.cuda.is_available()
# (shape, layout, dtype, activation, residual, momentum): row tiles (NCHW), channels_last,
# channel blocks (7 x 7), odd sizes, a strided view, the fused epilogues, the cumulative
# average
CASES = [
    ((8, 16, 24, 24), "contiguous", torch.float32, None, False, 0.1),
    ((8, 16, 24, 24), "channels_last", torch.bfloat16, None, False, 0.1),
    ((8, 64, 7, 7), "contiguous", torch.float32, "relu", False, None),
    ((8, 64, 7, 7), "contiguous", torch.bfloat16, "relu", True, 0.1),
    ((3, 5, 33, 17), "contiguous", torch.float32, "silu", False, 0.1),
    ((6, 8, 20, 20), "channel_slice", torch.float16, None, False, 0.3),
    ((8, 16, 24, 24), "channels_last", torch.float32, "relu", True, None),
]


@pytest.fixture
def persistent_on(monkeypatch):
    monkeypatch.setattr(persistent_plan, "MODE", "on")


def _train_step(x, act, residual, momentum, mode, monkeypatch, seed=3):
    """A module's training forward and backward with persistent_plan.MODE = mode: (y,
    dx, dweight, dbias, dres, running mean, running var, num_batches_tracked, launches)."""
    monkeypatch.setattr(persistent_plan, "MODE", mode)
    c = x.shape[1]
    gen = torch.Generator().manual_seed(seed)
    m = bnkernels.BatchNormAct2d(c, momentum=momentum, activation=act).to(x.device)
    with torch.no_grad():
        m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(c, generator=gen))
        m.running_mean.copy_(torch.randn(c, generator=gen))
        m.num_batches_tracked.fill_(3)
    m = m.to(x.dtype)
    xx = x.detach().clone().requires_grad_()
    res = None
    if residual:
        res = (torch.randn(x.shape, generator=gen) * 0.5).to(x.device, x.dtype)
        res.requires_grad_()
    g = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
    before = collections.Counter(triton_launch.launch_counts)
    y = m(xx, res)
    y.backward(g)
    counts = collections.Counter(triton_launch.launch_counts)
    counts.subtract(before)
    return (y.detach(), xx.grad, m.weight.grad, m.bias.grad,
            None if res is None else res.grad, m.running_mean.clone(), m.running_var.clone(),
            int(m.num_batches_tracked), +counts)


def _input(shape, layout, dtype, device):
    return make_input(shape, dtype, device, layout, loc=3.0, scale=2.0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[3]}-{c[4]}")
def test_matches_three_kernels(case, device, monkeypatch):
    shape, layout, dtype, act, residual, momentum = case
    x = _input(shape, layout, dtype, device)
    three = _train_step(x, act, residual, momentum, "off", monkeypatch)
    one = _train_step(x, act, residual, momentum, "on", monkeypatch)
    assert "persistent" not in three[-1]
    # forward and backward each one launch on a GPU, three phases through the interpreter
    assert dict(one[-1]) == {"persistent": 2 if ON_GPU else 6}, one[-1]
    assert one[7] == three[7] == 4  # num_batches_tracked: counted once
    names = ["y", "dx", "dweight", "dbias", "dres", "running_mean", "running_var"]
    for name, a, b in zip(names, one, three):
        if a is None:
            assert b is None
        elif not ON_GPU:
            assert torch.equal(a, b), name  # the same partials, merge order and apply
        else:
            tol = TOL[dtype] if name in ("y", "running_mean", "running_var") else GRAD_TOL[dtype]
            assert_close_scaled(a.float(), b.float(), tol, name)


@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[3]}")
def test_against_float64(case, device, persistent_on):
    """The forward's output and batch statistics against the float64 reference."""
    shape, layout, dtype, act, residual, momentum = case
    x = _input(shape, layout, dtype, device)
    c = shape[1]
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    before = triton_launch.launch_counts["persistent"]
    y = bnkernels.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5)
    assert triton_launch.launch_counts["persistent"] > before
    expected = float64_reference(x, None, None, None, None, True)[0]
    assert_close_scaled(y.double(), expected, TOL[dtype], "y")
    x64 = x.double()
    dims = [0] + list(range(2, x.dim()))
    mean = x64.mean(dims)
    n = x.numel() // c
    assert_close_scaled(rm.double(), (0.1 * mean).to(rm.device), TOL[torch.float32], "mean")
    unbiased = x64.var(dims, unbiased=True)
    assert_close_scaled(rv.double(), (0.9 + 0.1 * unbiased).to(rv.device),
                        (1e-5, 1e-5 * n ** 0.5), "var")


def test_deterministic(device, persistent_on):
    x = _input((8, 16, 24, 24), "channels_last", torch.float32, device)
    runs = []
    for _ in range(2):
        rm, rv = torch.zeros(16, device=device), torch.ones(16, device=device)
        y = bnkernels.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5)
        runs.append((y, rm, rv))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_replayed_calls(device, persistent_on):
    """A repeated call replays its recorded persistent launch(es), to the same bits."""
    x = _input((8, 16, 24, 24), "contiguous", torch.float32, device)
    m = bnkernels.BatchNorm2d(16).to(device)
    first = m(x)
    before = triton_launch.launch_counts["persistent"]
    second = m(x)
    assert triton_launch.launch_counts["persistent"] - before == (1 if ON_GPU else 3)
    assert torch.equal(first, second)
    assert int(m.num_batches_tracked) == 2


@pytest.mark.skipif(ON_GPU, reason="the interpreter's program order makes the barrier time "
                    "out; a GPU's never does here")
def test_barrier_timeout_raises(monkeypatch):
    """A barrier that gives up: a RuntimeError, the running statistics and the counter
    untouched, the barrier's state reset for the next launch."""
    monkeypatch.setattr(persistent_plan, "MODE", "on")
    monkeypatch.setattr(persistent_plan, "INTERPRETER_PHASES", False)
    monkeypatch.setattr(persistent_plan, "SPIN_LIMIT", 3)
    m = bnkernels.BatchNorm2d(16)
    x = _input((8, 16, 24, 24), "contiguous", torch.float32, "cpu")
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    with pytest.raises(RuntimeError, match="grid barrier timed out"):
        m(x)
    assert torch.equal(m.running_mean, rm) and torch.equal(m.running_var, rv)
    assert int(m.num_batches_tracked) == 0
    assert not persistent_plan.barrier_state(x.device).any()
    monkeypatch.setattr(persistent_plan, "INTERPRETER_PHASES", True)
    m(x)
    assert int(m.num_batches_tracked) == 1


def _takes_persistent(x, **kwargs) -> bool:
    before = triton_launch.launch_counts["persistent"]
    bnkernels.batch_norm(x, None, None, None, None, True, 0.1, 1e-5, **kwargs)
    return triton_launch.launch_counts["persistent"] > before


def test_rule(device, monkeypatch):
    x = _input((8, 16, 24, 24), "contiguous", torch.float32, device)
    monkeypatch.setattr(persistent_plan, "MODE", "off")
    assert not _takes_persistent(x)
    monkeypatch.setattr(persistent_plan, "MODE", "auto")
    assert _takes_persistent(x) == ON_GPU  # CPU tensors: only "on" takes it
    monkeypatch.setattr(persistent_plan, "MODE", "on")
    assert _takes_persistent(x)
    # one split (a tiny tensor): no merge, the three-kernel path's two launches
    assert not _takes_persistent(_input((2, 3, 4, 4), "contiguous", torch.float32, device))


@pytest.mark.skipif(not ON_GPU, reason="a CUDA device: streams, L2 and residency")
def test_rule_on_gpu(monkeypatch):
    x = _input((16, 32, 32, 32), "contiguous", torch.bfloat16, "cuda")
    monkeypatch.setattr(persistent_plan, "MODE", "auto")
    assert _takes_persistent(x)
    with torch.cuda.stream(torch.cuda.Stream()):  # a side stream: never
        assert not _takes_persistent(x)
    torch.cuda.synchronize()
    monkeypatch.setattr(persistent_plan, "L2_FRACTION", 1e-6)  # past the size rule
    assert not _takes_persistent(x)
    monkeypatch.setattr(persistent_plan, "MODE", "on")  # "on" skips the size rule
    assert _takes_persistent(x)


@pytest.mark.skipif(not ON_GPU, reason="a CUDA device")
@pytest.mark.parametrize("shape", [(32, 2048, 7, 7), (32, 128, 28, 28), (128, 512, 7, 7)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_resnet_shapes_on_gpu(shape, channels_last, persistent_on):
    """ResNet-50's shapes that the size rule takes, their grids as large as the rule
    allows: one launch each way, y and dx against the float64 reference. The gradient is
    random: a gradient of ones would make dx about zero and leave the backward unchecked."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to("cuda", torch.bfloat16)
    g = torch.randn(shape, generator=gen).to("cuda", torch.bfloat16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    before = collections.Counter(triton_launch.launch_counts)
    y = bnkernels.batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
    y.backward(g)
    counts = collections.Counter(triton_launch.launch_counts)
    counts.subtract(before)
    assert dict(+counts) == {"persistent": 2}
    x64 = x.detach().double().requires_grad_()
    y64 = torch.nn.functional.batch_norm(x64, None, None, training=True, eps=1e-5)
    y64.backward(g.double())  # the gradient as the kernel saw it, rounded to bfloat16
    assert_close_scaled(y.detach(), y64.detach(), TOL[torch.bfloat16], "y")
    assert_close_scaled(x.grad, x64.grad, GRAD_TOL[torch.bfloat16], "dx")
