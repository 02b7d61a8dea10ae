"""Differential fuzzing (hypothesis) of bnkernels.batch_norm against torch's batch_norm in
float64, on both kernel backends: shapes, input layouts, dtypes and dtype mixes, per-channel
tensors as views (strided, sliced, a matrix column, expanded), training and eval, and one
autograd mode per example: backward, forward-mode AD (dual tensors) or double backward."""
import contextlib
import os

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnkernels
from helpers import (CHANNEL_VIEWS, GRAD_TOL, LAYOUTS, TOL, assert_close_scaled, channel_base,
                     channel_view, kernels_only, layout_applies, make_input, random_params)

# Every test here runs on each kernel backend: Triton and the CUDA C++ of csrc/.
pytestmark = pytest.mark.usefixtures("kernel_backend")

PARAMS = ("weight", "bias", "running_mean", "running_var")
# input dtype -> the parameter dtypes torch accepts with it
DTYPE_MIXES = {torch.float32: [torch.float32], torch.float64: [torch.float64],
               torch.float16: [torch.float16, torch.float32],
               torch.bfloat16: [torch.bfloat16, torch.float32]}


@st.composite
def cases(draw):
    dim = draw(st.integers(2, 5))
    shape = [draw(st.integers(1, 4)), draw(st.integers(1, 6))]
    shape += [draw(st.integers(1, 5)) for _ in range(dim - 2)]
    training = draw(st.booleans())
    if training and shape[0] * torch.Size(shape[2:]).numel() == 1:
        shape[0] = 2
    dtype = draw(st.sampled_from(list(DTYPE_MIXES)))
    mode = draw(st.sampled_from(["backward", "forward_ad", "double_backward"]))
    views = {}
    for name in PARAMS:
        kinds = CHANNEL_VIEWS
        if training and name.startswith("running"):  # written: an expanded one is refused
            kinds = [k for k in kinds if k != "expanded"]
        views[name] = draw(st.sampled_from(kinds))
    return dict(shape=shape, training=training, dtype=dtype, mode=mode, views=views,
                pdtype=draw(st.sampled_from(DTYPE_MIXES[dtype])),
                layout=draw(st.sampled_from([l for l in LAYOUTS if layout_applies(l, dim)])),
                affine=draw(st.booleans()), loc=draw(st.sampled_from([0.0, 2.0, -30.0])),
                seed=draw(st.integers(0, 2**16)))


def _inputs(case, device):
    x = make_input(case["shape"], case["dtype"], device, case["layout"], loc=case["loc"],
                   scale=2.0, seed=case["seed"])
    values = random_params(case["shape"][1], torch.float64, device, seed=case["seed"])
    bases = {name: channel_base(case["views"][name], v) for name, v in zip(PARAMS, values)}
    if not case["affine"]:
        bases["weight"] = bases["bias"] = None
    return x, bases


def _run(fn, x, bases, case, dtype, pdtype, copies=False):
    """y, the mode's derivatives (for x and the bases of weight and bias) and the running
    statistics' bases: fn on x in dtype and on the views of bases in pdtype, or, with
    copies, on contiguous copies of the views (taken inside the graph, and the statistics
    copied back through the views). The float64 reference runs on copies: torch's CPU
    backward misreads a strided running_var for 2-D inputs in eval mode (a NaN or
    1/sqrt(eps) where (N, C, L) inputs give 1/sqrt(var + eps))."""
    c, training = case["shape"][1], case["training"]
    # x keeps its layout: a copy of a sliced, stepped or expanded view would be dense
    # (nothing writes into x, so the leaf may share its storage)
    x = (x.detach() if x.dtype == dtype else x.detach().to(dtype)).requires_grad_(True)
    # copies (the bases stay as they were) of the values the case's dtype holds
    leaves = {k: None if b is None else b.detach().to(case["pdtype"]).to(pdtype, copy=True)
              .requires_grad_(k in PARAMS[:2]) for k, b in bases.items()}

    def view(k, leaves_):
        t = channel_view(case["views"][k], leaves_[k], c)
        return t.contiguous() if copies else t

    stats = {k: view(k, leaves) for k in PARAMS[2:]}

    def call(x, weight, bias):
        return fn(x, stats["running_mean"], stats["running_var"], weight, bias,
                  training=training, momentum=0.3)

    def views(leaves_):
        return [None if leaves_[k] is None else view(k, leaves_) for k in PARAMS[:2]]

    gen = torch.Generator().manual_seed(case["seed"] + 1)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device)
    wrt = [x] + [leaves[k] for k in PARAMS[:2] if leaves[k] is not None]
    if case["mode"] == "forward_ad":
        tangents = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t) for t in wrt]
        with fwAD.dual_level():
            duals = dict(leaves)
            # (torch's make_dual writes the tangent in the primal's layout: not stride 0)
            dual_x = fwAD.make_dual(x if 0 not in x.stride() else x.contiguous(), tangents[0])
            for k, t in zip([k for k in PARAMS[:2] if leaves[k] is not None], tangents[1:]):
                duals[k] = fwAD.make_dual(leaves[k], t)
            out = call(dual_x, *views(duals))
            y, derivs = fwAD.unpack_dual(out).primal, [fwAD.unpack_dual(out).tangent]
    else:
        y = call(x, *views(leaves))
        second = case["mode"] == "double_backward"
        derivs = list(torch.autograd.grad(y, wrt, g.to(y.dtype), create_graph=second,
                                          allow_unused=True))
        if second:  # d/d(x, w, b) of <dx, v>: a gradient penalty's second derivatives
            v = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x)
            derivs = list(torch.autograd.grad((derivs[0] * v).sum(), wrt, allow_unused=True))
    derivs = [torch.zeros_like(t) if d is None else d for d, t in zip(derivs, wrt)]
    if copies and training:
        for k in PARAMS[2:]:
            channel_view(case["views"][k], leaves[k], c).copy_(stats[k])
    return y, derivs, {k: leaves[k] for k in PARAMS[2:]}  # the statistics' bases, written


# CI draws the same 30 examples each run (derandomized: a red CI run is reproducible);
# BNKERNELS_FUZZ_EXAMPLES=N draws N fresh ones.
FRESH_EXAMPLES = int(os.environ.get("BNKERNELS_FUZZ_EXAMPLES", "0"))


@settings(max_examples=FRESH_EXAMPLES or 30, derandomize=not FRESH_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_differential_against_torch_float64(case, device):
    x, bases = _inputs(case, device)
    with kernels_only() if x.numel() else contextlib.nullcontext():
        y, derivs, stats = _run(bnkernels.batch_norm, x, bases, case, case["dtype"],
                                case["pdtype"])
    y64, derivs64, stats64 = _run(F.batch_norm, x, bases, case, torch.float64, torch.float64,
                                  copies=True)
    assert y.dtype == case["dtype"]
    assert_close_scaled(y, y64, TOL[case["dtype"]], msg="output")
    # The derivatives cancel terms of size |gamma| * rstd * |g| * (1 + |xhat|) (the
    # three-path dx, and its derivatives): compare on the scale of those terms.
    running_var = bases["running_var"].double()
    var = (x.double().transpose(0, 1).reshape(x.shape[1], -1).var(1, correction=0)
           if case["training"] and x.numel() else channel_view(case["views"]["running_var"],
                                                               running_var, x.shape[1]))
    gamma = 1.0 if bases["weight"] is None else bases["weight"].double().abs().max()
    rstd = (var + 1e-5).rsqrt().max() if var.numel() else torch.tensor(1.0)
    order = 2 if case["mode"] == "double_backward" else 1
    scale = float(max(1.0, gamma) * rstd ** order * (1 + y64.detach().abs().max() if y64.numel() else 1))
    tol = tuple(8 * t for t in GRAD_TOL[case["dtype"]])
    for name, d, e in zip(["x", "weight", "bias"], derivs, derivs64):
        assert_close_scaled(d, e, tol, msg=f"{case['mode']} of {name}", scale=scale)
    for name in PARAMS[2:]:
        assert_close_scaled(stats[name], stats64[name], TOL[case["pdtype"]], msg=name)
