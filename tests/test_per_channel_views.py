"""Per-channel tensors (weight, bias, running_mean, running_var) passed as views: strided,
expanded (stride 0), sliced out of a bigger tensor, or of another shape with C elements.
The kernels read them through their strides, the gradients reach the tensors they view,
and running statistics given as views are updated in place through the view. Each case is
checked against torch.nn.functional.batch_norm on the same views and against a float64
reference on contiguous copies. Also: the output's and dx's strides are torch's."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import bnkernels
from helpers import (GRAD_TOL, TOL, assert_close_scaled, channel_base, channel_view,
                     channel_view_of, float64_reference, kernels_only, make_input, random_params)

# Every test here runs on each kernel backend: Triton and the CUDA C++ of csrc/.
pytestmark = pytest.mark.usefixtures("kernel_backend")

C = 5


VIEWS = ["strided", "sliced", "column", "expanded"]


def _params(kind, device, seed=1):
    """(views, bases) for weight, bias, running_mean, running_var."""
    pairs = [channel_view_of(kind, t) for t in random_params(C, torch.float32, device, seed=seed)]
    return [v for v, _ in pairs], [b for _, b in pairs]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", VIEWS)
def test_forward_and_running_stats_through_views(kind, training, layout, device):
    x = make_input((4, C, 3, 6), torch.float32, device, layout, loc=0.5, scale=2.0)
    (w, b, rm, rv), bases = _params(kind, device)
    (tw, tb, trm, trv), tbases = _params(kind, device)
    copies = [t.clone() for t in (w, b, rm, rv)]
    if kind == "expanded" and training:
        # every channel would write the one element: refused with an in-place op's error,
        # before anything is written (torch's batch_norm lets one channel's value win)
        before = [t.clone() for t in bases]
        with pytest.raises(RuntimeError, match="more than one element of the written-to"):
            bnkernels.batch_norm(x, rm, rv, w, b, training=True)
        assert all(torch.equal(a, e) for a, e in zip(bases, before))
        rm, rv, trm, trv = (t.clone() for t in (rm, rv, trm, trv))
        bases, tbases = bases[:2], tbases[:2]
    with kernels_only():
        y = bnkernels.batch_norm(x, rm, rv, w, b, training=training, momentum=0.1)
    y_torch = F.batch_norm(x, trm, trv, tw, tb, training=training, momentum=0.1)
    expected = float64_reference(x, *copies, training)
    assert_close_scaled(y, expected[0], TOL[torch.float32])
    torch.testing.assert_close(y, y_torch)
    # the running statistics changed through the views, every other element of the base
    # left as it was: the bases equal torch's bases
    for ours, theirs in zip(bases, tbases):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", VIEWS)
def test_gradients_reach_the_viewed_tensors(kind, training, device):
    x0 = make_input((3, C, 7), torch.float32, device, loc=-1.0, scale=3.0)
    g = make_input((3, C, 7), torch.float32, device, seed=7)
    results = []
    for fn, ours in ((F.batch_norm, False), (bnkernels.batch_norm, True)):
        (_, _, rm, rv), _ = _params(kind, device)
        if training:  # (written: views of them are test_forward_and_running_stats_through_views')
            rm, rv = rm.clone(), rv.clone()
        wv, w_base = channel_view_of(kind, random_params(C, torch.float32, device)[0])
        bv, b_base = channel_view_of(kind, random_params(C, torch.float32, device)[1])
        w_base.requires_grad_(True), b_base.requires_grad_(True)
        x = x0.clone().requires_grad_(True)
        # the views are taken from the leaves inside the graph, as a sliced parameter is
        w, b = _rebuild(kind, w_base), _rebuild(kind, b_base)
        if ours:
            with kernels_only():
                y = fn(x, rm, rv, w, b, training=training)
                y.backward(g)
        else:
            fn(x, rm, rv, w, b, training=training).backward(g)
        results.append((x.grad, w_base.grad, b_base.grad))
    for ours, theirs, name in zip(results[1], results[0], ("x", "weight base", "bias base")):
        assert_close_scaled(ours, theirs, GRAD_TOL[torch.float32], msg=f"grad of {name}")


def _rebuild(kind, base):
    """The view `channel_view_of` hands out, taken again from `base` (a leaf that requires
    grad)."""
    return channel_view(kind, base, C)


@pytest.mark.parametrize("shape", [(1, C, 1, 1), (1, C), (C, 1)])
def test_per_channel_tensors_of_another_shape(shape, device):
    """weight and bias of C elements in another shape are taken as (C,), as torch does."""
    x = make_input((2, C, 3, 4), torch.float32, device, loc=0.5)
    w, b, rm, rv = random_params(C, torch.float32, device)
    expected = F.batch_norm(x, rm.clone(), rv.clone(), w.reshape(shape), b.reshape(shape),
                            training=True)
    with kernels_only():
        y = bnkernels.batch_norm(x, rm.clone(), rv.clone(), w.reshape(shape),
                                 b.reshape(shape), training=True)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("kind", ["strided", "expanded"])
def test_functional_call_with_view_parameters(kind, device):
    """torch.func.functional_call replacing a module's weight and bias by views, gradients
    through torch.func.grad back to the tensors viewed."""
    x = make_input((4, C, 3, 3), torch.float32, device, loc=0.3, scale=1.5)
    g = make_input((4, C, 3, 3), torch.float32, device, seed=5)
    w_base = channel_base(kind, random_params(C, torch.float32, device)[0])
    b_base = channel_base(kind, random_params(C, torch.float32, device)[1])

    def loss(module, w_base, b_base, buffers):
        # (the buffers are arguments: a transform refuses to mutate a captured tensor)
        params = {"weight": _rebuild(kind, w_base), "bias": _rebuild(kind, b_base), **buffers}
        return (torch.func.functional_call(module, params, (x,)) * g).sum()

    results = []
    for module, guard in ((torch.nn.BatchNorm2d(C), contextlib.nullcontext),
                          (bnkernels.BatchNorm2d(C), kernels_only)):
        buffers = {k: v.clone() for k, v in module.to(device).named_buffers()}
        with guard():
            grads = torch.func.grad(loss, argnums=(1, 2))(module, w_base, b_base, buffers)
        results.append((grads, buffers))
    (actual, ours), (expected, theirs) = results[1], results[0]
    for a, e in zip(actual, expected):
        assert_close_scaled(a, e, GRAD_TOL[torch.float32])
    assert theirs["num_batches_tracked"] == 1 and theirs["running_mean"].abs().min() > 0
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], msg=name)


def test_module_whose_parameters_are_slices_of_one_tensor(device):
    """Two BN layers whose weights are slices of one flat parameter (as in a packed
    optimizer state): the forward reads each slice, the backward writes each slice's part."""
    flat = torch.nn.Parameter(torch.rand(2 * C + 1, device=device) + 0.5)
    x = make_input((3, C, 4, 4), torch.float32, device, loc=0.2)
    grads = []
    for fn in (F.batch_norm, bnkernels.batch_norm):
        flat.grad = None
        with kernels_only() if fn is bnkernels.batch_norm else contextlib.nullcontext():
            y = fn(x, None, None, flat[1:1 + C], None, training=True)
            y = fn(y, None, None, flat[1 + C:], None, training=True)
            (y * x).sum().backward()
        grads.append(flat.grad.clone())
    assert grads[1][0] == 0
    assert_close_scaled(grads[1], grads[0], GRAD_TOL[torch.float32])


# ------------------------------------------------------------------- output strides

STRIDE_INPUTS = {
    "contiguous": lambda x: x,
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "transposed_hw": lambda x: x.transpose(2, 3),
    "swapped_nc": lambda x: x.transpose(0, 1).contiguous().transpose(0, 1),
    "channel_slice": lambda x: torch.cat([x, x], 1)[:, ::2],
    "expanded": lambda x: x[:1].expand_as(x),
}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", list(STRIDE_INPUTS))
def test_output_and_input_grad_strides_are_torchs(name, training, device):
    x0 = STRIDE_INPUTS[name](make_input((3, C, 4, 6), torch.float32, device, loc=0.1))
    results = []
    for fn, guard in ((F.batch_norm, contextlib.nullcontext), (bnkernels.batch_norm, kernels_only)):
        w, b, rm, rv = random_params(C, torch.float32, device)
        x = x0.detach().requires_grad_(True)
        with guard():
            y = fn(x, rm, rv, w, b, training=training)
            y.backward(torch.ones_like(y))
        results.append((y, x.grad))
    (y_ours, dx_ours), (y_torch, dx_torch) = results[1], results[0]
    assert y_ours.stride() == y_torch.stride(), (y_ours.stride(), y_torch.stride())
    assert dx_ours.stride() == dx_torch.stride(), (dx_ours.stride(), dx_torch.stride())
    torch.testing.assert_close(y_ours, y_torch)
    if y_torch.is_contiguous():
        assert y_ours.view(-1).shape == (y_ours.numel(),)  # .view works where torch's does


def test_transposed_2d_input_gives_a_contiguous_output(device):
    x = make_input((C, 6), torch.float32, device).t()  # (6, C), channels the contiguous axis
    with kernels_only():
        y = bnkernels.batch_norm(x, None, None, training=True)
    expected = F.batch_norm(x, None, None, training=True)
    assert y.stride() == expected.stride()
    torch.testing.assert_close(y, expected)
