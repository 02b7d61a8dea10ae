"""Fused epilogues: act(bn(x) + residual) in one pass (batch_norm(activation=, residual=),
BatchNormAct*d), against the unfused torch ops in float64 and in the input's dtype."""
import collections
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import bnkernels
from bnkernels import activations
from helpers import (GRAD_TOL, TOL, assert_close_scaled, kernels_only, launches, make_input,
                     random_params)

# Every test here runs on each kernel backend: Triton and the CUDA C++ of csrc/.
pytestmark = pytest.mark.usefixtures("kernel_backend")

ACTS = [None, "relu", "silu", "gelu"]


def unfused(x, rm, rv, w, b, training, activation, residual):
    """torch's ops, one after another: batch_norm, add, activation."""
    z = F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
    if residual is not None:
        z = z + residual
    return activations.apply(z, activation)


def _cases():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for layout in ("contiguous", "channels_last"):
            if dtype == torch.float32 or layout == "channels_last":
                yield dtype, layout


@pytest.mark.parametrize("dtype,layout", list(_cases()))
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_fused_matches_unfused(dtype, layout, activation, with_residual, training, device):
    shape = (3, 5, 7, 6)
    x0 = make_input(shape, dtype, device, layout, loc=0.3, scale=1.5)
    r0 = make_input(shape, dtype, device, layout, seed=3) if with_residual else None
    g = make_input(shape, dtype, device, "contiguous", seed=7)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # AMP-style
    w0, b0, rm, rv = random_params(shape[1], param_dtype, device)

    def run(cast, fn, guard):
        leaves = [t.detach().to(cast(t)).requires_grad_(True) for t in (x0, w0, b0)]
        res = None if r0 is None else r0.detach().to(cast(r0)).requires_grad_(True)
        rm_, rv_ = rm.clone().to(cast(rm)), rv.clone().to(cast(rv))
        with guard:
            y = fn(leaves[0], rm_, rv_, leaves[1], leaves[2], training, activation, res)
            grads = torch.autograd.grad(y, leaves + ([res] if res is not None else []),
                                        g.to(y.dtype))
        return (y, *grads), (rm_, rv_)

    def ours(x, rm_, rv_, w, b, training, activation, res):
        return bnkernels.batch_norm(x, rm_, rv_, w, b, training, 0.1, 1e-5,
                                    activation=activation, residual=res)

    got, got_stats = run(lambda t: t.dtype, ours, kernels_only())
    f64, f64_stats = run(lambda t: torch.float64, unfused, contextlib.nullcontext())
    # torch's CPU batch_norm refuses some mixed-dtype inputs: its run is all in x's dtype
    same, _ = run(lambda t: dtype, unfused, contextlib.nullcontext())
    names = ["y", "dx", "dweight", "dbias", "dresidual"]
    for name, a, e, t in zip(names, got, f64, same):
        assert a.dtype == (dtype if name in ("y", "dx", "dresidual") else w0.dtype), name
        assert a.shape == t.shape, name
        # the gradients of a BN are differences of O(|g|) terms: compare on g's scale
        scale = None if name == "y" else max(1.0, g.double().abs().max().item() * (
            x0.numel() / x0.shape[1] if name in ("dweight", "dbias") else 1.0))
        tol = TOL[dtype] if name == "y" else GRAD_TOL[dtype]  # (g is rounded to dtype)
        assert_close_scaled(a, e, tol, msg=f"{name} vs float64", scale=scale)
        if name == "y" or dtype in (torch.float32, torch.float64):
            # (Not gradients in 16 bits: torch rounds z before relu's z > 0 test, we don't,
            # so a z within a rounding of 0 may take the other branch; float64 rules above.)
            # (torch's run has its parameters rounded to dtype as well: its tolerance)
            assert_close_scaled(a, t.double(), tuple(3 * v for v in GRAD_TOL[dtype]),
                                msg=f"{name} vs torch in {dtype}", scale=scale)
    for a, e in zip(got_stats, f64_stats):
        assert_close_scaled(a, e, TOL[param_dtype])


def _launches(backend):
    return collections.Counter(launches(backend))


@pytest.mark.parametrize("training", [True, False])
def test_one_elementwise_pass(training, device, kernel_backend):
    """bn + add + act is the BN's own launches, no extra pass: Triton's (reduce,) apply,
    with no merge where one program holds each channel (as here); csrc/'s one fused launch
    (one block per channel here) or apply."""
    x = make_input((2, 3, 4, 5), torch.float32, device)
    r = make_input((2, 3, 4, 5), torch.float32, device, seed=2)
    w, b, rm, rv = random_params(3, torch.float32, device)
    before = _launches(kernel_backend)
    with kernels_only():
        bnkernels.batch_norm(x, rm, rv, w, b, training, activation="silu", residual=r)
    launched = _launches(kernel_backend) - before
    if kernel_backend == "cuda":
        expected = {"fused": 1} if training else {"apply": 1}
    else:
        expected = {"apply": 1}
        if training:
            expected.update(reduce=1)
    assert dict(launched) == expected


def _saved_activation_bytes(fn, x):
    """Bytes of the x-sized tensors autograd saves for fn(x) (each storage counted once)."""
    storages = {}

    def pack(t):
        if t.numel() == x.numel():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(storages.values())


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
def test_saves_no_more_than_unfused(activation, device):
    """The memory requirement: backward recomputes z from x, so fused BN+act saves x alone,
    where nn.BatchNorm2d + act save x and the BN output (or the act output)."""
    x = make_input((4, 8, 6, 6), torch.float32, device).requires_grad_(True)
    ours = bnkernels.BatchNormAct2d(8, activation=activation).to(device)
    ref_bn = torch.nn.BatchNorm2d(8).to(device)
    fused = _saved_activation_bytes(ours, x)
    plain = _saved_activation_bytes(lambda t: activations.apply(ref_bn(t), activation), x)
    assert fused == x.numel() * x.element_size()
    assert plain == 2 * fused


def test_module_state_dict_and_repr(device):
    ref = torch.nn.BatchNorm2d(6).to(device)
    with torch.no_grad():
        ref.running_mean.uniform_(-1, 1)
        ref.weight.uniform_(0.5, 1.5)
    ours = bnkernels.BatchNormAct2d(6, activation="gelu").to(device)
    ours.load_state_dict(ref.state_dict())  # a checkpoint loads either way
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(ours.state_dict())
    assert repr(ours) == repr(ref).replace("BatchNorm2d", "BatchNormAct2d")[:-1] + \
        ", activation='gelu')"
    assert isinstance(ours, torch.nn.BatchNorm2d)
    assert bnkernels.BatchNormAct2d(6).activation == "relu"
    for cls, shape in ((bnkernels.BatchNormAct1d, (4, 6, 3)), (bnkernels.BatchNormAct3d,
                                                               (2, 6, 2, 3, 2))):
        m = cls(6, activation="silu").to(device)
        x, r = make_input(shape, torch.float32, device), make_input(shape, torch.float32, device)
        with kernels_only():
            y = m(x, r)
        expected = F.silu(F.batch_norm(x.double(), None, None, training=True) + r.double())
        assert_close_scaled(y, expected, TOL[torch.float32])


def test_module_over_steps_matches_torch(device):
    """Training steps then eval: running statistics, momentum=None, num_batches_tracked."""
    ref = torch.nn.BatchNorm2d(4, momentum=None).to(device)
    ours = bnkernels.BatchNormAct2d(4, momentum=None, activation="relu").to(device)
    for step in range(3):
        x = make_input((3, 4, 5, 5), torch.float32, device, seed=step)
        r = make_input((3, 4, 5, 5), torch.float32, device, seed=10 + step)
        with kernels_only():
            y = ours(x, r)
        assert_close_scaled(y, torch.relu(ref(x) + r), TOL[torch.float32])
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name))
    ours.eval(), ref.eval()
    with kernels_only():
        y = ours(x)
    assert_close_scaled(y, torch.relu(ref(x)), TOL[torch.float32])


def test_bad_arguments(device):
    x = make_input((2, 3, 4), torch.float32, device)
    with pytest.raises(ValueError, match="activation must be one of"):
        bnkernels.batch_norm(x, None, None, training=True, activation="tanh")
    with pytest.raises(ValueError, match="activation must be one of"):
        bnkernels.BatchNormAct1d(3, activation="gelu_tanh")
    m = bnkernels.BatchNormAct1d(3).to(device)
    for bad, pattern in ((x[:1], "residual must have the input's shape"),
                         (x.double(), "residual must have the input's dtype"),
                         (x[:, :1], "residual must have the input's shape")):
        with pytest.raises(RuntimeError, match=pattern):
            m(x, bad)
    with pytest.raises(TypeError, match="residual must be a Tensor"):
        m(x, 1.0)
    assert m.num_batches_tracked.item() == 0  # the calls that raised changed nothing


def test_gradient_reaches_residual_alone(device):
    """x without grad, residual with: the residual still gets dL/dz."""
    x = make_input((3, 2, 5), torch.float32, device)
    r = make_input((3, 2, 5), torch.float32, device, seed=4).requires_grad_(True)
    g = make_input((3, 2, 5), torch.float32, device, seed=5)
    with kernels_only():
        y = bnkernels.batch_norm(x, None, None, training=True, activation="relu", residual=r)
        (dr,) = torch.autograd.grad(y, r, g)
    z = F.batch_norm(x.double(), None, None, training=True) + r.double()
    assert_close_scaled(dr, torch.where(z > 0, g.double(), 0.0), TOL[torch.float32])


def test_empty_batch(device):
    x = torch.empty(0, 3, 4, device=device, requires_grad=True)
    r = torch.empty(0, 3, 4, device=device, requires_grad=True)
    m = bnkernels.BatchNormAct1d(3).to(device)
    y = m(x, r)
    assert y.shape == x.shape
    dx, dr = torch.autograd.grad(y.sum(), (x, r))
    assert dx.shape == x.shape and dr.shape == r.shape


@pytest.mark.parametrize("activation", [None, "relu"])
def test_opcheck_fused(activation, device):
    x = make_input((3, 4, 5, 2), torch.float32, device, "channels_last").requires_grad_(True)
    r = make_input((3, 4, 5, 2), torch.float32, device, seed=2).requires_grad_(True)
    w = torch.rand(4, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    args = (x, w, b, None, None, True, 1e-5, activation, r)
    with kernels_only():
        opcheck(torch.ops.bnkernels.batch_norm_fwd.default, args)
        y, mean, rstd, _ = torch.ops.bnkernels.batch_norm_fwd(*args)
        # relu after a residual: the backward reads the output's sign, not the residual
        res, out = (None, y.detach()) if activation == "relu" else (r.detach(), None)
        opcheck(torch.ops.bnkernels.batch_norm_bwd.default,
                (torch.randn_like(y), x.detach(), w.detach(), b.detach(), res, out, mean,
                 rstd, None, 1e-5, activation, True, True, activation is not None))


def test_compiled_fullgraph_equals_eager(device):
    backend = "inductor" if device == "cuda" else "aot_eager"
    m = bnkernels.BatchNormAct2d(4, activation="silu").to(device)
    x0 = make_input((2, 4, 3, 5), torch.float32, device, "channels_last")
    r0 = make_input((2, 4, 3, 5), torch.float32, device, seed=3)
    outs = []
    for fn in (m, torch.compile(m, fullgraph=True, backend=backend)):
        x, r = x0.clone().requires_grad_(True), r0.clone().requires_grad_(True)
        with kernels_only():
            y = fn(x, r)
            outs.append((y, *torch.autograd.grad(y.square().sum(), (x, r, m.weight))))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
