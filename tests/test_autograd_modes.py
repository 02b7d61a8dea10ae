"""Every autograd mode against torch's BatchNorm in float64: forward-mode AD (jvp, dual
tensors), torch.func (grad, jacrev, vmap of grad: per-sample gradients), double backward
(gradgradcheck, Hessian-vector products), fused epilogues included, on both kernel
backends. Each comparison runs the kernels (kernels_only); torch's side runs outside."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jacrev, jvp, vmap

import bnkernels
from bnkernels import activations
from helpers import kernels_only

pytestmark = pytest.mark.usefixtures("kernel_backend")
DT = torch.float64


def _inputs(shape=(3, 4, 5), seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=DT).to(device)

    return dict(x=r(*shape) * 2 + 0.5, weight=torch.rand(c, generator=gen, dtype=DT) + 0.5,
                bias=r(c), residual=r(*shape), rm=r(c), rv=torch.rand(c, generator=gen,
                                                                      dtype=DT) + 0.5)


def _torch_bn(x, weight, bias, residual, rm, rv, training, activation):
    y = F.batch_norm(x, rm, rv, weight, bias, training, 0.1, 1e-5)
    if residual is not None:
        y = y + residual
    return activations.apply(y, activation)


def _ours(x, weight, bias, residual, rm, rv, training, activation):
    return bnkernels.batch_norm(x, rm, rv, weight, bias, training, 0.1, 1e-5,
                                activation=activation, residual=residual)


EPILOGUES = [(None, False), ("relu", False), ("silu", True), ("gelu", False), ("relu", True)]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation,with_residual", EPILOGUES)
def test_jvp_matches_torch(training, activation, with_residual, device):
    t = _inputs(device=device)
    tangents = _inputs(seed=1, device=device)
    names = ["x", "weight", "bias"] + (["residual"] if with_residual else [])

    def call(fn):
        def f(*primals):
            kw = dict(zip(names, primals))
            return fn(kw["x"], kw["weight"], kw["bias"], kw.get("residual"), t["rm"].clone(),
                      t["rv"].clone(), training, activation)
        return jvp(f, tuple(t[n] for n in names), tuple(tangents[n] for n in names))

    expected = call(_torch_bn)
    with kernels_only():
        got = call(_ours)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


@pytest.mark.parametrize("training", [True, False])
def test_dual_tensors_through_the_module(training, device):
    t = _inputs(shape=(4, 3, 2, 3), device=device)
    ref = torch.nn.BatchNorm2d(3).to(device, DT).train(training)
    ours = bnkernels.BatchNorm2d(3).to(device, DT).train(training)
    tangent = _inputs(shape=(4, 3, 2, 3), seed=2, device=device)["x"]
    with forward_ad.dual_level():
        y_ref = forward_ad.unpack_dual(ref(forward_ad.make_dual(t["x"], tangent)))
        with kernels_only():
            y = forward_ad.unpack_dual(ours(forward_ad.make_dual(t["x"], tangent)))
    assert y.tangent is not None
    torch.testing.assert_close(y.primal, y_ref.primal)
    torch.testing.assert_close(y.tangent, y_ref.tangent)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)


@pytest.mark.parametrize("training", [True, False])
def test_func_grad_and_jacrev(training, device):
    t = _inputs(device=device)

    def loss(fn):
        return lambda x, w, b: (fn(x, w, b, None, t["rm"].clone(), t["rv"].clone(), training,
                                   None) * t["residual"]).sum()

    expected = grad(loss(_torch_bn), argnums=(0, 1, 2))(t["x"], t["weight"], t["bias"])
    with kernels_only():
        got = grad(loss(_ours), argnums=(0, 1, 2))(t["x"], t["weight"], t["bias"])
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)

    def out(fn):
        return lambda x: fn(x, t["weight"], t["bias"], None, t["rm"].clone(), t["rv"].clone(),
                            training, None)

    x = t["x"][:2, :, :3]
    with kernels_only():
        jac = jacrev(out(_ours))(x)
    torch.testing.assert_close(jac, jacrev(out(_torch_bn))(x))


def test_per_sample_gradients_with_functional_call(device):
    """The torch.func recipe: vmap(grad(loss)) over samples, parameters by functional_call,
    an eval-mode BatchNorm (one sample's statistics would be meaningless)."""
    torch.manual_seed(0)
    torch_model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3),
                                      torch.nn.ReLU(), torch.nn.Flatten(),
                                      torch.nn.Linear(3 * 4 * 4, 2)).to(device, DT)
    with torch.no_grad():
        torch_model[1].running_mean.uniform_(-1, 1)
        torch_model[1].running_var.uniform_(0.5, 2)
    torch_model.eval()
    model = torch.nn.Sequential(*[torch_model[0], bnkernels.BatchNorm2d(3), *torch_model[2:]])
    model[1].load_state_dict(torch_model[1].state_dict())
    model.to(device, DT).eval()
    params = {k: v.detach() for k, v in torch_model.named_parameters()}
    buffers = {k: v.detach() for k, v in torch_model.named_buffers()}
    x = torch.randn(5, 2, 6, 6, dtype=DT, device=device)
    target = torch.randn(5, 2, dtype=DT, device=device)

    def per_sample(m):
        def loss(p, xi, ti):
            return F.mse_loss(functional_call(m, (p, buffers), (xi[None],)), ti[None])
        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)

    expected = per_sample(torch_model)
    with kernels_only():
        got = per_sample(model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)


def test_vmap_over_training_batches(device):
    """vmap of a training-mode call: statistics per vmapped sample, as torch's."""
    t = _inputs(shape=(3, 4, 5), device=device)
    xs = torch.stack([t["x"], t["residual"]])

    def f(fn):
        return vmap(lambda x: fn(x, t["weight"], t["bias"], None, None, None, True, None))

    with kernels_only():
        got = f(_ours)(xs)
    torch.testing.assert_close(got, f(_torch_bn)(xs))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation,with_residual", [(None, False), ("silu", True),
                                                      ("relu", True)])
def test_gradgradcheck(training, activation, with_residual, device):
    t = _inputs(shape=(2, 3, 3), device=device)
    args = [t["x"], t["weight"], t["bias"]] + ([t["residual"]] if with_residual else [])
    args = [a.clone().requires_grad_(True) for a in args]
    if activation == "relu":  # keep z away from relu's kink, where the numerical check is off
        with torch.no_grad():
            z = _torch_bn(args[0], args[1], args[2], args[3] if with_residual else None,
                          t["rm"], t["rv"], training, None)
            args[2] += torch.where(z.abs() < 0.1, 0.3, 0.0).amax(dim=(0, 2))

    def f(x, w, b, *res):
        return _ours(x, w, b, res[0] if res else None, t["rm"].clone(), t["rv"].clone(),
                     training, activation)

    with kernels_only():
        assert torch.autograd.gradgradcheck(f, tuple(args))


@pytest.mark.parametrize("training", [True, False])
def test_second_derivatives_match_torch(training, device):
    """A gradient penalty's double backward: d/d(x, w, b) of |dL/dx|^2, vs torch's."""
    t = _inputs(shape=(4, 3, 5), device=device)
    v = _inputs(shape=(4, 3, 5), seed=3, device=device)["x"]

    def penalty_grads(fn):
        x, w, b = (t[n].clone().requires_grad_(True) for n in ("x", "weight", "bias"))
        y = fn(x, w, b, None, t["rm"].clone(), t["rv"].clone(), training, None)
        (gx,) = torch.autograd.grad((y * v).sum() + y.pow(3).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), (x, w, b))

    expected = penalty_grads(_torch_bn)
    with kernels_only():
        got = penalty_grads(_ours)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_second_derivatives_sum_in_float32(dtype, device):
    """The double backward in a half dtype rounds each derivative once. A constant channel
    (rstd = 1/sqrt(eps)) makes second derivatives of size 1e5, the sum of larger terms of
    both signs: summed in float16, those terms overflowed where the result does not (13 of
    512 values came out inf). Now the values past float16's range are inf, the rest near
    float64 (torch's own float16 double backward, on CPU, gives NaN here)."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 64, 1, 1, generator=gen, dtype=DT).expand(8, 64, 1, 1).to(device)
    g, v = (torch.randn(8, 64, 1, 1, generator=gen, dtype=DT).to(device) for _ in range(2))

    def second(fn, dt):
        x = x0.to(dt).requires_grad_(True)
        y = fn(x, None, None, None, None, None, True, "silu")
        (dx,) = torch.autograd.grad(y, x, g.to(dt), create_graph=True)
        return torch.autograd.grad((dx * v.to(dt)).sum(), x)[0]

    exact = second(_torch_bn, DT)
    with kernels_only():
        got = second(_ours, dtype)
    rounded = exact.to(dtype)
    beyond = rounded.isinf()
    assert torch.equal(got[beyond], rounded[beyond])
    assert beyond.sum() < beyond.numel() // 2
    scale = exact.abs().max()
    torch.testing.assert_close(got[~beyond].double(), exact[~beyond], rtol=0,
                               atol=4e-3 * scale if dtype == torch.float16 else 3e-2 * scale)
