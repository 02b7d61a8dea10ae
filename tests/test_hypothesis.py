"""Property-based: random shapes, layouts, dtypes and modes against torch.nn.functional
and the float64 reference."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnkernels
from helpers import (GRAD_TOL, LAYOUTS, TOL, assert_close_scaled, float64_reference, kernels_only,
                     layout_applies, make_input, random_params)


@st.composite
def cases(draw):
    dim = draw(st.integers(2, 5))
    shape = [draw(st.integers(1, 5)), draw(st.integers(1, 9))]
    shape += [draw(st.integers(1, 7)) for _ in range(dim - 2)]
    layout = draw(st.sampled_from([l for l in LAYOUTS if layout_applies(l, dim)]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    training = draw(st.booleans())
    if training and shape[0] * max(1, torch.Size(shape[2:]).numel()) == 1:
        shape[0] = 2
    return dict(shape=shape, layout=layout, dtype=dtype, training=training,
                affine=draw(st.booleans()), loc=draw(st.sampled_from([0.0, 3.0, -50.0])),
                seed=draw(st.integers(0, 2**16)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_random_cases(case, device):
    dtype = case["dtype"]
    x = make_input(case["shape"], dtype, device, case["layout"], loc=case["loc"],
                   scale=2.0, seed=case["seed"]).requires_grad_(True)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    w, b, rm, rv = random_params(case["shape"][1], pdtype, device, seed=case["seed"])
    if not case["affine"]:
        w = b = None
    else:
        w.requires_grad_(True), b.requires_grad_(True)
    ours_rm, ours_rv = rm.clone(), rv.clone()
    with kernels_only():
        y = bnkernels.batch_norm(x, ours_rm, ours_rv, w, b, case["training"], 0.25)
        grads = torch.autograd.grad(y.double().square().sum(), [t for t in (x, w, b) if t is not None])
    expected = float64_reference(x.detach(), w, b, rm, rv, case["training"])
    assert_close_scaled(y, expected[0], TOL[dtype])
    # torch in float64 for the gradients and the running statistics. (Not torch in the same
    # dtype: for a constant channel its CPU kernel's x*a + b form is 1e-4 off beta in float32.)
    x2 = x.detach().double().requires_grad_(True)
    w2, b2 = (None, None) if w is None else (w.detach().double().requires_grad_(True),
                                             b.detach().double().requires_grad_(True))
    rm2, rv2 = rm.double(), rv.double()
    y2 = torch.nn.functional.batch_norm(x2, rm2, rv2, w2, b2, case["training"], 0.25)
    grads2 = torch.autograd.grad(y2.square().sum(), [t for t in (x2, w2, b2) if t is not None])
    tol = tuple(4 * t for t in GRAD_TOL[dtype])
    # dx = gamma*rstd*(g - mean(g) - xhat*mean(g*xhat)): its terms are gamma*rstd*|g| in size
    # and can cancel to almost nothing (two values per channel, say): scale by the terms.
    rstd = expected[2] if case["training"] else torch.rsqrt(rv2 + 1e-5)
    gamma = 1.0 if w2 is None else w2.detach().abs()
    dx_terms = float(2 * y2.detach().abs().max() * (rstd * gamma).max()) if x.numel() else 1.0
    assert_close_scaled(grads[0], grads2[0], tol, scale=max(1.0, dx_terms))
    for a, e in zip(grads[1:], grads2[1:]):
        assert_close_scaled(a, e, tol)
    assert_close_scaled(ours_rm, rm2, TOL[pdtype])
    assert_close_scaled(ours_rv, rv2, TOL[pdtype])
