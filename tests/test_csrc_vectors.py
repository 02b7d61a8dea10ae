"""The CUDA C++ backend's vectors (csrc/bn_kernels.cuh): a thread takes 16 bytes at once
along the contiguous axis (VEC rows of a channel, NCHW; VEC channels of a row,
channels_last; VEC values of a channel block's contiguous span, NCHW whose S takes no
whole vectors, 7 x 7) wherever every element tensor of the call allows it
(launch.vector_width, channel_blocks_fit), and one element otherwise. All of them,
against float64, in every dtype, with and without splits, through every epilogue
template, at the emulation's block size and the GPU's; and which calls take which."""
import pytest
import torch
import torch.nn.functional as F

import bnkernels
from bnkernels.backends.cuda import launch as cuda_launch
from bnkernels.backends.cuda import plan as cuda_plan
from conftest import cuda_toolkit_missing
from helpers import GRAD_TOL, TOL, assert_close_scaled, kernels_only, make_input, random_params

pytestmark = pytest.mark.skipif(cuda_toolkit_missing(), reason="no CUDA toolkit to build csrc/")

ACTIVATIONS = {None: lambda z: z, "relu": F.relu, "silu": F.silu, "gelu": F.gelu}


@pytest.fixture(autouse=True)
def cuda_backend(monkeypatch):
    monkeypatch.setenv("BNKERNELS_BACKEND", "cuda")


@pytest.fixture
def widths(monkeypatch):
    """The vector width of every plan made (block_plan's vec; channel blocks' as -vec)."""
    seen = []
    real, real_blocks = cuda_launch.block_plan, cuda_launch.channel_block_plan

    def record(n, c, s, channels_fast, device, vec=1):
        seen.append(vec)
        return real(n, c, s, channels_fast, device, vec)

    def record_blocks(n, c, s, device, vec):
        plan = real_blocks(n, c, s, device, vec)
        if plan is not None:
            seen.append(-vec)
        return plan

    monkeypatch.setattr(cuda_launch, "block_plan", record)
    monkeypatch.setattr(cuda_launch, "channel_block_plan", record_blocks)
    return seen


def _reference(x, w, b, res, activation, g):
    """y and the gradients of x, w, b (and res) in float64, through torch's ops."""
    leaves = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
    r = None if res is None else res.detach().double().requires_grad_(True)
    z = F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True)
    y = ACTIVATIONS[activation](z if r is None else z + r)
    grads = torch.autograd.grad(y, leaves + ([r] if r is not None else []), g.double())
    return (y, *grads)


def _ours(x, w, b, res, activation, g):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    r = None if res is None else res.detach().clone().requires_grad_(True)
    with kernels_only():
        y = bnkernels.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True,
                                 activation=activation, residual=r)
        grads = torch.autograd.grad(y, leaves + ([r] if r is not None else []), g)
    return (y, *grads)


# NCHW: S = 24, a multiple of every dtype's vector (8, 4, 2); channels_last: C = 16;
# channel blocks: S = 49 (7 x 7) and 9 (3 x 3), no multiple of any vector, C = 16
SHAPES = {"contiguous": (4, 5, 4, 6), "channels_last": (3, 16, 5, 3),
          "blocks": (5, 16, 7, 7), "blocks_3x3": (6, 16, 3, 3)}
EPILOGUES = [(None, False), ("relu", False), ("relu", True), ("silu", True), ("gelu", False)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "blocks", "blocks_3x3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("activation,with_res", EPILOGUES)
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("threads", [64, 256])
def test_vectors_match_float64(layout, dtype, activation, with_res, split, threads, widths,
                               monkeypatch):
    monkeypatch.setattr(cuda_plan, "EMULATED_BLOCK_THREADS", threads)
    monkeypatch.setattr(cuda_plan, "EMULATED_BLOCKS", 64 if split else 1)
    monkeypatch.setattr(cuda_plan, "CUDA_MIN_ROWS_PER_LANE", 1 if split else 2**40)
    shape = SHAPES[layout]
    memory = "channels_last" if layout == "channels_last" else "contiguous"
    vec = 16 // dtype.itemsize
    if layout == "blocks_3x3" and vec > 9:
        pytest.skip("S = 9 is shorter than a 16-bit vector (8 values: two channels at most)")
    x = make_input(shape, dtype, "cpu", memory, loc=2.0, scale=1.5)
    res = make_input(shape, dtype, "cpu", memory, seed=3) if with_res else None
    g = make_input(shape, dtype, "cpu", memory, seed=5)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    w, b, _, _ = random_params(shape[1], pdtype, "cpu")
    ours = _ours(x, w, b, res, activation, g)
    # every call took vectors (channel blocks': -vec)
    assert set(widths) == ({-vec} if layout.startswith("blocks") else {vec})
    want = _reference(x, w, b, res, activation, g)
    for name, a, e in zip(("y", "dx", "dw", "db", "dres"), ours, want):
        tol = (TOL if name == "y" else GRAD_TOL)[dtype]
        assert_close_scaled(a, e, tuple(2 * t for t in tol), msg=name)


def test_vectors_in_eval_and_over_many_splits(widths, monkeypatch):
    """Eval's one kernel, and a channel whose rows span more splits than a merge block
    has threads (each thread sums several, then the tree)."""
    monkeypatch.setattr(cuda_plan, "EMULATED_BLOCKS", 4096)
    monkeypatch.setattr(cuda_plan, "CUDA_MIN_ROWS_PER_LANE", 1)
    x = make_input((8, 2, 64, 40), torch.float32, "cpu", loc=-3.0, scale=0.5)
    w, b, rm, rv = random_params(2, torch.float32, "cpu")
    plan = cuda_plan.block_plan(8, 2, 64 * 40, False, x.device, 4)
    assert plan.splits > cuda_plan.EMULATED_BLOCK_THREADS
    with kernels_only():
        y = bnkernels.batch_norm(x, rm.clone(), rv.clone(), w, b, True)
        y_eval = bnkernels.batch_norm(x, rm, rv, w, b, False)
    assert set(widths) == {4}
    x64 = x.double()
    assert_close_scaled(y, F.batch_norm(x64, None, None, w.double(), b.double(), True),
                        TOL[torch.float32])
    assert_close_scaled(y_eval, F.batch_norm(x64, rm.double(), rv.double(), w.double(),
                                             b.double(), False), TOL[torch.float32])


@pytest.mark.parametrize("case,expected", [
    ("aligned", 4), ("offset", 1), ("odd_spatial", 1), ("odd_channels_last", 1),
    ("channels_last", 4), ("strided_grad", 1)])
def test_which_calls_take_vectors(case, expected):
    """16 bytes at once only where every element tensor's vectors are whole and aligned."""
    base = torch.randn(2, 8, 4, 6)
    tensors = {
        "aligned": [base, torch.randn(2, 8, 4, 6)],
        "offset": [torch.randn(2 * 8 * 24 + 1)[1:].view(2, 8, 4, 6)],  # 4 bytes off
        "odd_spatial": [torch.randn(2, 8, 3, 5)],  # S = 15
        "odd_channels_last": [torch.randn(2, 6, 4, 6).to(memory_format=torch.channels_last)],
        "channels_last": [base.to(memory_format=torch.channels_last)],
        "strided_grad": [base, torch.randn(2, 8, 4, 12)[..., ::2]],  # sS = 2
    }[case]
    n, c = tensors[0].shape[:2]
    s = tensors[0][0, 0].numel()
    fast = tensors[0].stride(1) == 1
    assert cuda_launch.vector_width(tensors, n, c, s, fast) == expected


def test_a_block_wider_than_its_threads(widths):
    """channels_last with many channels: 32 lanes of 8 channels, a block of 256 channels
    for the emulation's 64 threads."""
    x = make_input((3, 512, 2, 3), torch.bfloat16, "cpu", "channels_last", loc=1.0)
    g = make_input(x.shape, x.dtype, "cpu", "channels_last", seed=5)
    w, b, _, _ = random_params(512, torch.float32, "cpu")
    assert cuda_plan.block_plan(3, 512, 6, True, x.device, 8).block_c == 256
    ours = _ours(x, w, b, None, "relu", g)
    assert set(widths) == {8}
    for name, a, e in zip(("y", "dx", "dw", "db"), ours, _reference(x, w, b, None, "relu", g)):
        tol = (TOL if name == "y" else GRAD_TOL)[torch.bfloat16]
        assert_close_scaled(a, e, tuple(2 * t for t in tol), msg=name)
