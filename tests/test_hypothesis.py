"""Property-based: random shapes, layouts, dtypes and modes against torch.nn.functional
and the float64 reference."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnkernels
from helpers import (LAYOUTS, TOL, assert_close_scaled, float64_reference, kernels_only,
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
        grads = torch.autograd.grad(y.float().square().sum(), [t for t in (x, w, b) if t is not None])
    expected = float64_reference(x.detach(), w, b, rm, rv, case["training"])
    assert_close_scaled(y, expected[0], TOL[dtype])
    # torch in the same dtype, for the gradients and the running statistics
    x2 = x.detach().clone().requires_grad_(True)
    w2, b2 = (None, None) if w is None else (w.detach().clone().requires_grad_(True),
                                             b.detach().clone().requires_grad_(True))
    y2 = torch.nn.functional.batch_norm(x2, rm, rv, w2, b2, case["training"], 0.25)
    grads2 = torch.autograd.grad(y2.float().square().sum(), [t for t in (x2, w2, b2) if t is not None])
    tol = tuple(4 * t for t in TOL[dtype])
    for a, e in zip(grads, grads2):
        assert_close_scaled(a, e, tol)
    assert_close_scaled(ours_rm, rm, TOL[pdtype])
    assert_close_scaled(ours_rv, rv, TOL[pdtype])
