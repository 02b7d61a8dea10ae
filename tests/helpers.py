"""Inputs, layouts, tolerances and the "kernels really ran" guard shared by the tests."""
import contextlib
from unittest import mock

import torch
import torch.nn.functional as F

import bnkernels
from bnkernels import backends
from bnkernels.backends import reference
from bnkernels.fold import is_batchnorm
from bnkernels.replace import _TAKES_BIAS_FLAG

# (atol, rtol) against the float64 reference, per input dtype. The outputs are O(1)
# normalized values; gradients are compared on their own scale (assert_close_scaled).
# bfloat16: a result computed in float32 and rounded once to nearest is within half a
# bf16 ulp, 2^-8 relative, of the exact value (plus float32's own error, in atol). That is
# the tolerance a correctly rounding GPU kernel meets; one ulp (truncation) is not. The
# interpreter truncates, so conftest makes it round as a GPU does.
TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (2e-5, 2.0**-8),
}
# Gradients in 16-bit dtypes: grad_y itself arrives rounded to the input's dtype, and the
# three-path dx cancels its terms, so these compare against the float64 gradient of the
# unrounded loss with a tolerance for that input rounding, not for the kernel's.
GRAD_TOL = {**TOL, torch.bfloat16: (3e-2, 3e-2)}

BN_CLASSES = {2: (torch.nn.BatchNorm1d, bnkernels.BatchNorm1d),
              3: (torch.nn.BatchNorm1d, bnkernels.BatchNorm1d),
              4: (torch.nn.BatchNorm2d, bnkernels.BatchNorm2d),
              5: (torch.nn.BatchNorm3d, bnkernels.BatchNorm3d)}

# torch 2.13's BatchNorm takes bias=False; torch 2.11's (the GPU image's) does not, and there
# a bias-free BatchNorm is made as a user of it would: the bias registered as None.
BN_TAKES_BIAS_FLAG = _TAKES_BIAS_FLAG


def make_bn(cls, c, bias=True, **kwargs):
    """cls(c, bias=bias, **kwargs) on any torch: see BN_TAKES_BIAS_FLAG."""
    if bias:
        return cls(c, **kwargs)
    if BN_TAKES_BIAS_FLAG:
        return cls(c, bias=False, **kwargs)
    bn = cls(c, **kwargs)
    bn.register_parameter("bias", None)
    return bn


LAYOUTS = ("contiguous", "channels_last", "channel_slice", "spatial_slice", "expanded",
           "stepped", "transposed")


def layout_applies(layout, dim):
    if layout == "channels_last":
        return dim in (4, 5)
    if layout in ("spatial_slice", "stepped"):
        return dim >= 3
    if layout == "transposed":
        return dim >= 4
    return True


def make_input(shape, dtype, device, layout="contiguous", loc=0.0, scale=1.0, seed=0):
    """Random (never constant) data of the given shape, laid out as asked. Read in place
    by the kernels: channels_last; channel_slice x[:, ::2] and spatial_slice x[:, :, 1:-1]
    of bigger tensors; expanded, one sample broadcast over the batch (stride 0).
    Copied first (their spatial dims don't collapse to one stride): stepped x[..., ::2],
    transposed (the last two spatial dims swapped)."""
    gen = torch.Generator().manual_seed(seed)

    # (rounded to dtype before any view is taken: .to() of a sliced or expanded view
    # would make a dense copy, and the kernels would never see the view)
    def rand(*s):
        return (torch.randn(*s, generator=gen, dtype=torch.float64) * scale + loc).to(
            device, dtype)

    shape = list(shape)
    if layout == "contiguous":
        x = rand(*shape)
    elif layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = rand(*shape).contiguous(memory_format=fmt)
    elif layout == "channel_slice":
        x = rand(shape[0], 2 * shape[1], *shape[2:])[:, ::2]
    elif layout == "spatial_slice":
        x = rand(shape[0], shape[1], shape[2] + 2, *shape[3:])[:, :, 1:-1]
    elif layout == "expanded":
        # every sample the same: a channel whose spatial size is 1 is constant, where
        # torch's float32 results are themselves off (assert_as_near_as_torch)
        x = rand(1, *shape[1:]).expand(*shape)
    elif layout == "stepped":
        x = rand(*shape[:-1], 2 * shape[-1])[..., ::2]
    elif layout == "transposed":
        x = rand(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    else:
        raise ValueError(layout)
    assert list(x.shape) == shape and x.dtype == dtype
    return x


def random_params(c, dtype, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(device, dtype)
    bias = torch.randn(c, generator=gen, dtype=torch.float64).to(device, dtype)
    running_mean = torch.randn(c, generator=gen, dtype=torch.float64).to(device, dtype)
    running_var = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(device, dtype)
    return weight, bias, running_mean, running_var


CHANNEL_VIEWS = ("contiguous", "strided", "sliced", "column", "expanded")


def channel_base(kind, values):
    """A tensor that channel_view(kind, .) views as `values` (C,): the view's storage."""
    c = values.numel()
    if kind == "contiguous":
        return values.clone()
    if kind == "expanded":  # one value for every channel
        return values[:1].clone()
    base = {"strided": lambda: values.new_zeros(2 * c), "sliced": lambda: values.new_zeros(c + 3),
            "column": lambda: values.new_zeros(c, 3)}[kind]()
    with torch.no_grad():
        channel_view(kind, base, c).copy_(values)
    return base


def channel_view(kind, base, c):
    """A per-channel tensor of c elements viewing base: t[::2] (strided), a slice at an
    offset (sliced), a matrix column (column, stride 3), t.expand(c) (expanded, stride 0)."""
    return {"contiguous": lambda: base, "strided": lambda: base[::2],
            "sliced": lambda: base[2:2 + c], "column": lambda: base[:, 1],
            "expanded": lambda: base.expand(c)}[kind]()


def channel_view_of(kind, values):
    """(a view of kind holding values (C,), the base tensor it views)."""
    base = channel_base(kind, values)
    return channel_view(kind, base, values.numel()), base


def float64_reference(x, weight, bias, running_mean, running_var, training, eps=1e-5):
    """(y, mean, rstd, var) of the plain-torch math in float64."""
    d = [None if t is None else t.double() for t in (weight, bias, running_mean, running_var)]
    return reference.forward(x.double(), *d, training, eps)


def assert_close_scaled(actual, expected, tol, msg="", scale=None):
    """|actual - expected| <= atol*scale + rtol*|expected|, scale = max(1, max|expected|)
    unless given (the size of terms that cancel in expected, say)."""
    atol, rtol = tol
    expected = expected.to(torch.float64)
    if scale is None:
        scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.to(torch.float64), expected, atol=atol * scale,
                               rtol=rtol, msg=msg or None)


def assert_as_near_as_torch(actual, torch_result, float64_result, tol, msg=""):
    """actual within tol of torch's result (assert_close_scaled), or, where it is not, at
    least as near the float64 result as torch's is. Why: on a constant channel (an
    expanded batch of one spatial value) rstd is 1/sqrt(eps), and torch's float32 mean,
    a rounding away from the constant, comes out of the normalization 316 times larger:
    its y is 1e-4 off and its dweight -6e-5 where float64 gives exactly beta and 0."""
    try:
        assert_close_scaled(actual, torch_result, tol, msg=msg)
    except AssertionError:
        exact = float64_result.to(torch.float64)
        ours = (actual.to(torch.float64) - exact).abs().max().item()
        theirs = (torch_result.to(torch.float64) - exact).abs().max().item()
        if ours > theirs:
            raise


def _forbidden(*args, **kwargs):
    raise AssertionError("torch's batch_norm was called: the bnkernels path fell back")


def kernel_launches() -> int:
    """Launches so far of bnkernels' kernels: Triton's and csrc/'s (CUDA or emulated)."""
    return sum(launches("triton").values()) + sum(launches("cuda").values())


def launches(backend: str) -> dict:
    """Launches so far of one backend's kernels, by pass (reduce, merge, apply, fused)."""
    return backends.get(backend).launch_counts()


@contextlib.contextmanager
def kernels_only():
    """Inside: torch's batch_norm entry points raise, and on leaving, at least one
    bnkernels kernel (Triton or CUDA C++) must have been launched."""
    before = kernel_launches()
    with contextlib.ExitStack() as stack:
        for owner, name in ((torch, "batch_norm"), (torch, "native_batch_norm"),
                            (F, "batch_norm")):
            stack.enter_context(mock.patch.object(owner, name, _forbidden))
        yield
    assert kernel_launches() > before, "no bnkernels kernel was launched"


def randomize_norms(model, seed=0):
    """Random statistics and affine parameters (buffers too, for frozen BatchNorms), never
    the defaults of mean 0, var 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not is_batchnorm(m) or m.running_mean is None:
                continue
            c = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            if m.weight is not None:
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
    return model


def bn_pair(dim, c, dtype, device, **kwargs):
    """A torch BatchNorm and a bnkernels one with the same random state (weight, bias and
    running statistics not at their defaults)."""
    torch_cls, ours_cls = BN_CLASSES[dim]
    ref = make_bn(torch_cls, c, **kwargs).to(device)
    with torch.no_grad():
        w, b, rm, rv = random_params(c, torch.float32, device)
        if ref.weight is not None:
            ref.weight.copy_(w)
        if ref.bias is not None:
            ref.bias.copy_(b)
        if ref.running_mean is not None:
            ref.running_mean.copy_(rm)
            ref.running_var.copy_(rv)
    ref = ref.to(dtype)
    ours = make_bn(ours_cls, c, **kwargs).to(device, dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def onnx_export_and_run(model, x, path, dynamo=False):
    """model exported to ONNX at path and run by onnxruntime on x: (the graph's op types,
    its output)."""
    import onnx
    import onnxruntime as ort
    torch.onnx.export(model, (x,), str(path), dynamo=dynamo)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return ops, torch.from_numpy(out)


def assert_onnx_export_matches(folded, model, x, path, dynamo=False):
    """folded exported to ONNX (no BatchNormalization node left) and run in onnxruntime
    gives model(x)."""
    ops, out = onnx_export_and_run(folded, x, path, dynamo)
    assert "BatchNormalization" not in ops and "Conv" in ops
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)


class _InterpretedCompiled:
    """A compiled kernel whose runner runs the kernel in the interpreter, given what a real
    runner is given: every parameter positionally (constexprs too), a 3-D grid."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args: self.kernel[grid](*args)


def bound_launches_on_cpu(monkeypatch) -> list:
    """CPU tensors launch as CUDA ones do (pre-bound runners, replayed calls), the runners
    interpreting the kernels: the replay path computes for real, on CPU, eager.py's replays
    included. Returns the list that every replay run is appended to."""
    from bnkernels import eager
    from bnkernels.backends.triton import launch as triton_launch, replay
    monkeypatch.setattr(eager, "_FORWARD", {})
    monkeypatch.setattr(triton_launch, "_RUNNERS", {})
    monkeypatch.setattr(triton_launch, "_REPLAYS", {})
    monkeypatch.setattr(triton_launch, "bound_launches", True)
    monkeypatch.setattr(triton_launch, "cpu_launch", triton_launch._bound_launch)

    def first_launch(kernel, grid, args, meta):
        triton_launch._interpret(kernel, grid, args, meta)
        return _InterpretedCompiled(kernel)

    monkeypatch.setattr(triton_launch, "_first_launch", first_launch)
    ran = []
    real_run = replay.Replay.run

    def run(self, slots, counts):
        ran.append(self)
        real_run(self, slots, counts)

    monkeypatch.setattr(replay.Replay, "run", run)
    return ran
