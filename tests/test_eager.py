"""eager.py: a call repeated with a recorded signature runs its recorded launches, past the
checks and the layers; everything it gives is bitwise what the full path gives, and every
call that differs in anything the full path reads takes the full path.

The replays run here through pre-bound runners that interpret the kernels
(helpers.bound_launches_on_cpu), so they compute for real; the reference is the same calls
made in full every time (the interpreter's own path, which records nothing).
"""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

import bnkernels
from bnkernels import eager, functional, modules
from helpers import bound_launches_on_cpu, make_input


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("BNKERNELS_BACKEND", "triton")


@pytest.fixture
def full_calls(monkeypatch):
    """The calls that took the full path (checks, then batch_norm_impl), as a list."""
    seen = []
    real = functional.checked_batch_norm

    def spy(*args):
        seen.append(args)
        return real(*args)
    monkeypatch.setattr(functional, "checked_batch_norm", spy)
    monkeypatch.setattr(modules, "checked_batch_norm", spy)
    return seen


def _steps(route, shape, channels_last, momentum, seed_count=3):
    """Each of seed_count inputs through one call of the route; everything it gave, and
    the buffers after."""
    torch.manual_seed(0)
    c = shape[1]
    bn = bnkernels.BatchNorm2d(c, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    seen = []
    for i in range(seed_count):
        x = make_input(shape, torch.float32, "cpu", seed=i)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        if route == "eval":
            bn.eval()
            with torch.no_grad():
                seen.append(bn(x))
        elif route == "train_no_graph":
            with torch.no_grad():
                seen.append(bn(x))
        elif route == "functional_no_graph":  # plain tensors, not parameters
            seen.append(bnkernels.batch_norm(x, bn.running_mean, bn.running_var,
                                             bn.weight.detach(), bn.bias.detach(), True,
                                             0.1, 1e-5))
        else:  # a training step: forward, backward (fused: relu after a residual)
            x = x.requires_grad_(True)
            residual = torch.randn_like(x).requires_grad_(True) if route == "fused" else None
            y = bn(x) if residual is None else bnkernels.batch_norm(
                x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, 0.1, bn.eps,
                activation="relu", residual=residual)
            y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
            seen += [y, x.grad, bn.weight.grad, bn.bias.grad]
            seen += [] if residual is None else [residual.grad]
            bn.weight.grad = bn.bias.grad = None
    return seen + [bn.running_mean, bn.running_var, bn.num_batches_tracked]


ROUTES = ["eval", "train_no_graph", "functional_no_graph", "graph", "fused"]
# one split per channel, and several (a merge launch and its temporary)
SHAPES = [((4, 6, 5, 7), False), ((8, 6, 32, 32), True)]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("shape,channels_last", SHAPES)
def test_replayed_calls_give_bitwise_what_full_calls_give(route, shape, channels_last,
                                                          triton_backend, full_calls,
                                                          monkeypatch):
    momentum = None if route == "train_no_graph" else 0.1  # the cumulative average too
    full = _steps(route, shape, channels_last, momentum)
    assert len(full_calls) == 3  # the interpreter's path: no replays, every call in full
    full_calls.clear()
    with pytest.MonkeyPatch.context() as mp:
        ran = bound_launches_on_cpu(mp)
        replayed = _steps(route, shape, channels_last, momentum)
    assert len(full_calls) == 1  # the first call of the signature; the others replayed
    backwards = 2 if route in ("graph", "fused") else 0  # backward replays after the first
    assert len(ran) == 2 + backwards
    for a, b in zip(full, replayed, strict=True):
        assert a is None and b is None or torch.equal(a, b)


def _record(x, rm, rv, w, b, **kwargs):
    """One call in full (recorded), then one replayed."""
    return [bnkernels.batch_norm(x, rm, rv, w, b, **kwargs) for _ in range(2)]


def _call_args(c=6):
    x = make_input((4, c, 5, 7), torch.float32, "cpu")
    return x, torch.zeros(c), torch.ones(c), torch.rand(c) + 0.5, torch.randn(c)


def test_a_call_that_differs_in_anything_the_full_path_reads_takes_it(triton_backend,
                                                                       full_calls,
                                                                       monkeypatch):
    bound_launches_on_cpu(monkeypatch)
    x, rm, rv, w, b = _call_args()
    _record(x, rm, rv, w, b, training=True)
    assert len(full_calls) == 1
    variants = [
        lambda: bnkernels.batch_norm(x.double(), rm.double(), rv.double(), w.double(),
                                     b.double(), True),
        lambda: bnkernels.batch_norm(x.to(memory_format=torch.channels_last), rm, rv, w, b,
                                     True),
        lambda: bnkernels.batch_norm(x[:, :, 1:], rm, rv, w, b, True),  # strides, shape
        lambda: bnkernels.batch_norm(x, rm, rv, w, b, True, eps=1e-3),
        lambda: bnkernels.batch_norm(x, rm, rv, w, b, True, momentum=0.5),
        lambda: bnkernels.batch_norm(x, rm, rv, w, b, False),
        lambda: bnkernels.batch_norm(x, rm, rv, None, b, True),
        lambda: bnkernels.batch_norm(x, rm, rv, w, b, True, activation="relu"),
        lambda: bnkernels.batch_norm(x, rm, rv, w.requires_grad_(True), b, True),
    ]
    for i, call in enumerate(variants):
        call()
        assert len(full_calls) == 2 + i
    w.requires_grad_(False)
    with torch.no_grad():  # grad mode is part of the signature too
        bnkernels.batch_norm(x, rm, rv, w, b, True)
    assert len(full_calls) == 2 + len(variants)


def test_bad_input_after_a_replay_raises_torchs_error_and_writes_nothing(triton_backend,
                                                                         monkeypatch):
    bound_launches_on_cpu(monkeypatch)
    x, rm, rv, w, b = _call_args()
    _record(x, rm, rv, w, b, training=True)
    before = rm.clone(), rv.clone()
    for bad_weight in (torch.rand(5), torch.rand(6, dtype=torch.float64)):  # size, dtype
        with pytest.raises(RuntimeError) as ours:
            bnkernels.batch_norm(x, rm, rv, bad_weight, b, True)
        with pytest.raises(RuntimeError) as theirs:
            F.batch_norm(x, rm.clone(), rv.clone(), bad_weight, b, True)
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bnkernels.batch_norm(x[:1, :, :1, :1], rm, rv, w, b, True)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


def test_replays_are_refused_once_the_backend_choice_or_the_launch_hooks_change(
        triton_backend, full_calls, monkeypatch):
    from bnkernels.backends.triton import launch as triton_launch
    ran = bound_launches_on_cpu(monkeypatch)
    x, rm, rv, w, b = _call_args()
    _record(x, rm, rv, w, b, training=False)
    assert len(full_calls) == 1 and len(ran) == 1
    monkeypatch.setenv("BNKERNELS_BACKEND", "torch")
    y = bnkernels.batch_norm(x, rm, rv, w, b, False)
    assert len(full_calls) == 2 and len(ran) == 1  # the torch backend, in full
    torch.testing.assert_close(y, F.batch_norm(x, rm, rv, w, b, False))
    monkeypatch.setenv("BNKERNELS_BACKEND", "triton")
    monkeypatch.setattr(triton_launch, "bound_launches", False)
    bnkernels.batch_norm(x, rm, rv, w, b, False)
    assert len(full_calls) == 3 and len(ran) == 1


def test_a_replay_reads_the_tensors_of_its_own_call(triton_backend, monkeypatch):
    """Only the signature is recorded: new values, new storage (a parameter's .data
    replaced) and new buffers are what a replay reads and writes."""
    bound_launches_on_cpu(monkeypatch)
    bn = bnkernels.BatchNorm2d(6)
    ref = torch.nn.BatchNorm2d(6)
    for step in range(4):
        x = make_input((4, 6, 5, 7), torch.float32, "cpu", seed=step)
        if step == 2:
            for m in (bn, ref):
                m.weight.data = torch.full((6,), 2.0)
                m.running_mean.data = torch.full((6,), 0.5)
        with torch.no_grad():
            torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item() == 4


def test_replayed_training_forward_moves_the_buffers_version_counters(triton_backend,
                                                                      monkeypatch):
    bound_launches_on_cpu(monkeypatch)
    bn = bnkernels.BatchNorm2d(6)
    x = make_input((4, 6, 5, 7), torch.float32, "cpu")
    versions = []
    for _ in range(3):
        with torch.no_grad():
            bn(x)
        versions.append((bn.running_mean._version, bn.running_var._version,
                         bn.num_batches_tracked._version))
    assert all(b > a for before, after in zip(versions, versions[1:])
               for a, b in zip(before, after))


def test_transforms_and_forward_ad_after_a_replay_take_the_full_path(triton_backend,
                                                                     full_calls,
                                                                     monkeypatch):
    bound_launches_on_cpu(monkeypatch)
    x, rm, rv, w, b = _call_args()
    w.requires_grad_(True)
    _record(x, rm, rv, w, b, training=False)
    assert len(full_calls) == 1
    grad = torch.func.grad(lambda x_: bnkernels.batch_norm(x_, rm, rv, w.detach(), b).sum())(x)
    expected = torch.func.grad(lambda x_: F.batch_norm(x_, rm, rv, w.detach(), b).sum())(x)
    torch.testing.assert_close(grad, expected)
    tangent = torch.randn_like(x)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, tangent)
        out = forward_ad.unpack_dual(bnkernels.batch_norm(dual, rm, rv, w, b)).tangent
    torch.testing.assert_close(out, tangent * w.detach()[:, None, None] / (rv[:, None, None]
                                                                         + 1e-5).sqrt())
    assert len(full_calls) == 3


def test_double_backward_through_a_replayed_forward(triton_backend, monkeypatch):
    """A gradient penalty: the replayed Function's backward with create_graph takes the
    differentiable backward (BatchNormBackwardFunction), as the full path's does."""
    def penalty():
        torch.manual_seed(0)
        x = make_input((4, 6, 5, 7), torch.float32, "cpu").requires_grad_(True)
        w = (torch.rand(6) + 0.5).requires_grad_(True)
        b = torch.randn(6).requires_grad_(True)
        out = []
        for _ in range(2):
            y = bnkernels.batch_norm(x, None, None, w, b, True)
            (gx,) = torch.autograd.grad((y * y.detach().cos()).sum(), x, create_graph=True)
            out += list(torch.autograd.grad(gx.square().sum(), (x, w, b), allow_unused=True))
        return out
    full = penalty()
    with pytest.MonkeyPatch.context() as mp:
        ran = bound_launches_on_cpu(mp)
        replayed = penalty()
    # the second forward (eager.py), and the second backward op's launches (launch.py's
    # replay: the differentiable backward runs the op, never eager.py's replay)
    assert len(ran) == 2
    assert full[2] is None  # dx does not depend on the bias
    for a, b in zip(full, replayed, strict=True):
        assert a is None and b is None or torch.equal(a, b)


@pytest.mark.parametrize("wanted", ["x", "weight", "bias", "x_and_bias"])
def test_backward_replays_give_exactly_the_gradients_wanted(wanted, triton_backend,
                                                            monkeypatch):
    def step():
        torch.manual_seed(0)
        x = make_input((4, 6, 5, 7), torch.float32, "cpu")
        w, b = torch.rand(6) + 0.5, torch.randn(6)
        leaves = {"x": x, "weight": w, "bias": b}
        for name in wanted.split("_and_"):
            leaves[name].requires_grad_(True)
        out = []
        for _ in range(3):
            for t in leaves.values():
                t.grad = None
            bnkernels.batch_norm(x, None, None, w, b, True).pow(2).sum().backward()
            out.append(tuple(t.grad for t in leaves.values()))
        return out
    full = step()
    with pytest.MonkeyPatch.context() as mp:
        ran = bound_launches_on_cpu(mp)
        replayed = step()
    assert len(ran) == 4  # the forward and the backward of calls 2 and 3
    for a, b in zip(full, replayed, strict=True):
        for ga, gb in zip(a, b, strict=True):
            assert ga is None and gb is None or torch.equal(ga, gb)


def test_an_empty_batch_is_never_recorded_and_still_counts(triton_backend, full_calls,
                                                            monkeypatch):
    bound_launches_on_cpu(monkeypatch)
    bn = bnkernels.BatchNorm2d(6)
    x = torch.randn(0, 6, 5, 7)
    for _ in range(2):
        with torch.no_grad():
            assert bn(x).shape == x.shape
    assert len(full_calls) == 2 and bn.num_batches_tracked.item() == 2
    assert torch.equal(bn.running_mean, torch.zeros(6))


class _CountingMode(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_compiling_and_dispatch_modes_after_a_replay_take_the_full_path(triton_backend,
                                                                        full_calls,
                                                                        monkeypatch):
    """What Dynamo traces and what a dispatch mode (FakeTensor, FlopCounter, a profiler's
    shapes) sees must be the custom op, never a replay that skips it."""
    bound_launches_on_cpu(monkeypatch)
    x, rm, rv, w, b = _call_args()
    _record(x, rm, rv, w, b, training=False)
    assert len(full_calls) == 1
    with _CountingMode():
        bnkernels.batch_norm(x, rm, rv, w, b, False)
    assert len(full_calls) == 2
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    bnkernels.batch_norm(x, rm, rv, w, b, False)
    assert len(full_calls) == 3


def test_replayed_backward_of_half_precision_parameters(triton_backend, monkeypatch):
    """A bfloat16 model: its weight and bias gradients, written by the kernels in bfloat16
    (contract.GradSums), replayed bitwise."""
    def steps():
        torch.manual_seed(0)
        bn = bnkernels.BatchNorm2d(6).to(torch.bfloat16)
        out = []
        for seed in range(3):
            x = make_input((8, 6, 32, 32), torch.bfloat16, "cpu", seed=seed)
            x.requires_grad_(True)
            bn(x).backward(torch.ones_like(x).cumsum(-1).sin())
            out += [x.grad, bn.weight.grad, bn.bias.grad]
            bn.weight.grad = bn.bias.grad = None
        return out
    full = steps()
    with pytest.MonkeyPatch.context() as mp:
        ran = bound_launches_on_cpu(mp)
        replayed = steps()
    assert len(ran) == 4  # forward and backward of steps 2 and 3
    assert all(g.dtype == torch.bfloat16 for g in replayed)
    for a, b in zip(full, replayed, strict=True):
        assert torch.equal(a, b)
