"""bnkernels.BatchNorm*d and bnkernels.batch_norm against torch.nn.BatchNorm* and a
float64 reference: shapes, layouts, dtypes, modes, gradients, running statistics."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import bnkernels
from helpers import (GRAD_TOL, LAYOUTS, TOL, assert_as_near_as_torch, assert_close_scaled,
                     bn_pair, float64_reference, kernels_only, layout_applies, make_input,
                     random_params)

# Every test here runs on each kernel backend: Triton and the CUDA C++ of csrc/.
pytestmark = pytest.mark.usefixtures("kernel_backend")

SHAPES = [(7, 5), (4, 3, 17), (3, 6, 9, 11), (2, 4, 3, 5, 7), (1, 3, 2, 2), (5, 2, 1, 1)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _cases():
    """Every layout in float32; the layouts that change the kernels' code path
    (flat rows or not, a copy first or not) in the other dtypes."""
    for dtype in DTYPES:
        for shape in SHAPES:
            for layout in LAYOUTS:
                if layout_applies(layout, len(shape)) and (
                        dtype == torch.float32 or layout in ("contiguous", "channels_last", "stepped")):
                    yield shape, layout, dtype


@pytest.mark.parametrize("shape,layout,dtype", list(_cases()))
@pytest.mark.parametrize("training", [True, False])
def test_functional_matches_float64_reference(shape, layout, dtype, training, device):
    x = make_input(shape, dtype, device, layout, loc=0.5, scale=2.0)
    # AMP-style float32 parameters, float64 ones for float64 (torch rejects that mix)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    w, b, rm, rv = random_params(shape[1], pdtype, device)
    expected = float64_reference(x, w, b, rm, rv, training)
    rm_ours, rv_ours = rm.clone(), rv.clone()
    with kernels_only():
        y = bnkernels.batch_norm(x, rm_ours, rv_ours, w, b, training=training, momentum=0.1)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close_scaled(y, expected[0], TOL[dtype])
    if training:
        m = x.numel() // shape[1]
        exp_rm = 0.9 * rm.double() + 0.1 * expected[1]
        exp_rv = 0.9 * rv.double() + 0.1 * expected[3] * m / (m - 1)
        assert_close_scaled(rm_ours, exp_rm, TOL[torch.float32])
        assert_close_scaled(rv_ours, exp_rv, TOL[torch.float32])
    else:
        assert torch.equal(rm_ours, rm) and torch.equal(rv_ours, rv)


@pytest.mark.parametrize("shape,layout,dtype", list(_cases()))
@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_torch(shape, layout, dtype, training, device):
    x0 = make_input(shape, dtype, device, layout, loc=-1.0, scale=3.0)
    g = make_input(shape, dtype, device, "contiguous", seed=7)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ref, ours = bn_pair(len(shape), shape[1], param_dtype, device)
    ref.train(training), ours.train(training)
    exact = copy.deepcopy(ref).double()  # the float64 judge where torch's float32 is off
    grads = []
    for module in (ref, ours, exact):
        x = x0.detach().double() if module is exact else x0.detach()
        x.requires_grad_(True)  # a leaf with x0's strides
        with kernels_only() if module is ours else contextlib.nullcontext():
            y = module(x)
            grads.append((y,) + torch.autograd.grad(y, (x, module.weight, module.bias),
                                                    g.to(x.dtype)))
    # torch's results are rounded to dtype too: two roundings apart, at most
    for name, a, e, e64 in zip(("y", "dx", "dweight", "dbias"), grads[1], grads[0], grads[2]):
        assert a.dtype == e.dtype, name
        tol = tuple(2 * t for t in (TOL if name == "y" else GRAD_TOL)[dtype])
        assert_as_near_as_torch(a, e, e64, tol, msg=f"{name} differs from torch")
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dim", [2, 3, 4, 5])
@pytest.mark.parametrize("kwargs", [
    {}, {"affine": False}, {"track_running_stats": False}, {"momentum": None},
    {"bias": False}, {"eps": 1e-3, "momentum": 0.3},
])
def test_module_matches_torch_over_steps(dim, kwargs, device):
    """Several training steps (running statistics, num_batches_tracked), then eval."""
    shape = [(6, 4), (3, 4, 10), (3, 4, 5, 6), (2, 4, 3, 4, 5)][dim - 2]
    ref, ours = bn_pair(dim, 4, torch.float32, device, **kwargs)
    assert repr(ref) == repr(ours)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for step in range(3):
        x = make_input(shape, torch.float32, device, loc=step + 0.5, scale=1.5, seed=step)
        with kernels_only():
            y = ours(x)
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    for name, buf in ref.named_buffers():
        torch.testing.assert_close(getattr(ours, name), buf, rtol=1e-5, atol=1e-6, msg=name)
    ref.eval(), ours.eval()
    x = make_input(shape, torch.float32, device, loc=2.0, seed=9)
    with kernels_only():
        y = ours(x)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_module_with_half_buffers(dtype, device):
    """model.half(): parameters and running statistics in half precision too."""
    ref, ours = bn_pair(4, 3, dtype, device)
    x = make_input((4, 3, 5, 5), dtype, device, loc=1.0)
    with kernels_only():
        y = ours(x)
    # against float64 at the rounding's tolerance; against torch's CPU half kernel, whose
    # own error is larger than one rounding, at the looser one
    w, b, rm, rv = (t.detach().double() for t in (ref.weight, ref.bias, ref.running_mean,
                                                  ref.running_var))
    assert_close_scaled(y, float64_reference(x, w, b, rm, rv, True)[0], TOL[dtype])
    tol = GRAD_TOL[dtype]
    assert_close_scaled(y, ref(x), tol)
    assert ours.running_mean.dtype == dtype
    assert_close_scaled(ours.running_mean, ref.running_mean, tol)
    assert_close_scaled(ours.running_var, ref.running_var, tol)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.channels_last_3d])
def test_output_keeps_memory_format(memory_format, device):
    shape = (2, 3, 4, 5) if memory_format == torch.channels_last else (2, 3, 2, 4, 5)
    cls = bnkernels.BatchNorm2d if len(shape) == 4 else bnkernels.BatchNorm3d
    x = torch.randn(shape, device=device).contiguous(memory_format=memory_format)
    x.requires_grad_(True)
    bn = cls(3).to(device)
    with kernels_only():
        y = bn(x)
        y.backward(torch.randn_like(y))
    assert y.is_contiguous(memory_format=memory_format)
    assert x.grad.is_contiguous(memory_format=memory_format)


def test_channels_last_read_without_copy(device, monkeypatch):
    """The common layouts go to the kernels as they are: no .contiguous() copy."""
    x = torch.randn(2, 6, 4, 5, device=device)
    inputs = (x, x.contiguous(memory_format=torch.channels_last), x[:, ::2], x[:, :, 1:3],
              x[:1].expand(3, -1, -1, -1))
    calls = []
    real = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous",
                        lambda t, *a, **k: calls.append(1) or real(t, *a, **k))
    for t in inputs:
        with kernels_only():
            bnkernels.batch_norm(t, None, None, training=True)
    assert calls == []


def test_functional_signature_matches_torch():
    import inspect
    ours = inspect.signature(bnkernels.batch_norm).parameters.values()
    theirs = inspect.signature(F.batch_norm).parameters.values()
    shared = [p for p in ours if p.kind != p.KEYWORD_ONLY]
    assert [(p.name, p.default) for p in shared] == [(p.name, p.default) for p in theirs]
    # the fused epilogue's arguments come after torch's, keyword-only
    assert [(p.name, p.default) for p in ours if p.kind == p.KEYWORD_ONLY] == \
        [("activation", None), ("residual", None)]


def test_isinstance_and_constructor():
    for ours, theirs in ((bnkernels.BatchNorm1d, torch.nn.BatchNorm1d),
                         (bnkernels.BatchNorm2d, torch.nn.BatchNorm2d),
                         (bnkernels.BatchNorm3d, torch.nn.BatchNorm3d)):
        m = ours(5, eps=1e-3, momentum=None, affine=False, track_running_stats=False)
        assert isinstance(m, theirs)
        assert repr(m) == repr(theirs(5, eps=1e-3, momentum=None, affine=False,
                                      track_running_stats=False))
    m = bnkernels.BatchNorm2d(4, dtype=torch.float64)
    assert m.weight.dtype == torch.float64
    m.running_mean.fill_(3.0)
    m.num_batches_tracked.fill_(5)
    m.reset_running_stats()
    assert m.running_mean.eq(0).all() and m.num_batches_tracked.item() == 0
