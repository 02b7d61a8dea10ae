"""The Triton backend's channel-block tiles (plan.channel_block_plan, kernels._lanes): NCHW
with a small S, a tile's lanes over a block of channels' contiguous values of one sample.

What is checked: the plan (blocks that divide C and start on 8-value boundaries, for
ResNet-50's 7x7 and 14x14), which launches take it (and which take row tiles), and that
its results match float64 and the row tiles' on every pass, with many blocks and splits,
the grouped loop and its tail, the fused epilogues, eval, and 64-bit indexing. That the
compiled code is 128 bits wide with no division is bench/static_check.py's (its test).
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bnkernels
from bnkernels.backends.triton import launch as triton_launch
from bnkernels.backends.triton import plan as triton_plan
from helpers import kernels_only, make_input, random_params

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import precision  # noqa: E402

CUDA = torch.device("cuda")


@pytest.mark.parametrize("n", [32, 128])
@pytest.mark.parametrize("c,s,block", [(2048, 49, 32), (512, 49, 32), (1024, 196, 8),
                                       (256, 196, 8)])
def test_resnet50_small_shapes_take_aligned_channel_blocks(n, c, s, block, monkeypatch):
    monkeypatch.setattr(triton_plan, "target_programs", lambda device: 4 * 132)
    plan = triton_plan.channel_block_plan(n, c, s, CUDA)
    assert plan is not None and plan.block_c == block
    assert plan.channel_span == block * s and plan.channel_span % 8 == 0  # 128-bit vectors
    assert plan.block_r == triton_plan.GPU_TILE >= plan.channel_span
    assert plan.c_blocks * plan.block_c == c  # blocks divide C: the lane mask is constant
    assert (plan.seg_c, plan.seg_s) == (block, 64 if s == 49 else 256)
    # the samples, split as rows are: every sample in one split, none empty
    assert plan.splits * plan.rows_per_split >= n > (plan.splits - 1) * plan.rows_per_split
    assert plan.c_blocks * plan.splits >= 132
    if (n, c, s) == (32, 2048, 49):  # 8 splits of 4 samples: 512 programs of the 528
        assert (plan.splits, plan.rows_per_split) == (8, 4)  # (rounded to groups once)


def test_channel_blocks_are_left_to_row_tiles_where_they_do_not_serve(monkeypatch):
    monkeypatch.setattr(triton_plan, "target_programs", lambda device: 4 * 132)
    assert triton_plan.channel_block_plan(32, 512, 784, CUDA) is None  # 28 x 28: rows align
    assert triton_plan.channel_block_plan(32, 67, 49, CUDA) is None  # a prime C: 1 x 49
    small = triton_plan.channel_block_plan(2, 3, 5, CUDA)  # the whole tensor's channels
    assert (small.block_c, small.channel_span, small.block_r) == (3, 15, 16)


def _spans(fn) -> set:
    """The CHANNEL_SPAN of every launch fn makes (0: row tiles)."""
    spans = set()
    real = triton_launch.cpu_launch

    def record(kernel, grid, args, meta):
        if "CHANNEL_SPAN" in meta:
            spans.add(meta["CHANNEL_SPAN"])
        return real(kernel, grid, args, meta)

    triton_launch.cpu_launch = record
    try:
        fn()
    finally:
        triton_launch.cpu_launch = real
    return spans


@pytest.mark.parametrize("layout,blocks", [("contiguous", True), ("expanded", True),
                                           ("channels_last", False), ("channel_slice", False),
                                           ("spatial_slice", False)])
def test_which_launches_take_channel_blocks(layout, blocks):
    """Channel blocks where every tensor holds a sample's C x S values contiguously (sN is
    free: an expanded batch, stride 0, too); row tiles otherwise."""
    x = make_input((3, 4, 5, 7), torch.float64, "cpu", layout)  # (float64: views kept)
    w, b, rm, rv = random_params(4, torch.float64, "cpu")
    with kernels_only():
        spans = _spans(lambda: bnkernels.batch_norm(x, rm, rv, w, b, training=True))
    assert (spans == {0}) != blocks and len(spans) == 1


def test_a_gradient_in_another_layout_takes_row_tiles():
    x = make_input((3, 4, 5, 7), torch.float32, "cpu").requires_grad_(True)
    g = make_input((3, 4, 5, 7), torch.float32, "cpu", "channels_last", seed=3)
    with kernels_only():
        y = bnkernels.batch_norm(x, None, None, training=True)
        assert _spans(lambda: y.backward(g)) == {0}


def _passes(x, w, b, rm, rv, residual, activation, training, seed=7):
    """y, and the gradients of x, w, b (and the residual), through bnkernels."""
    leaves = [t.detach().requires_grad_(True) for t in (x, w, b)]
    res = None if residual is None else residual.detach().requires_grad_(True)
    with kernels_only():
        y = bnkernels.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training=training,
                                 momentum=0.3, activation=activation, residual=res)
        g = make_input(y.shape, y.dtype, y.device, seed=seed)
        grads = torch.autograd.grad(y, leaves + ([res] if res is not None else []), g)
    return (y, *grads, rm, rv), g


def _reference(x, w, b, rm, rv, residual, activation, training, g):
    leaves = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
    res = None if residual is None else residual.detach().double().requires_grad_(True)
    rm, rv = rm.double(), rv.double()
    z = F.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training, 0.3, 1e-5)
    if res is not None:
        z = z + res
    y = {None: lambda t: t, "relu": torch.relu, "silu": F.silu}[activation](z)
    grads = torch.autograd.grad(y, leaves + ([res] if res is not None else []), g.double())
    return (y, *grads, rm, rv)


# (plan, shape, (activation, residual), training): every plan, shape and epilogue once
CASES = [("default_plan", (5, 16, 7, 7), (None, False), True),
         ("default_plan", (9, 6, 2, 3), ("relu", True), True),
         ("many_programs", (5, 16, 7, 7), (None, False), True),
         ("many_programs", (9, 6, 2, 3), ("silu", False), True),
         ("many_programs", (4, 12, 1, 5), ("relu", True), True),
         ("many_programs", (5, 16, 7, 7), ("relu", True), False),
         ("long_programs", (9, 6, 2, 3), (None, False), True),
         ("long_programs", (5, 16, 7, 7), ("silu", False), True),
         ("long_programs", (4, 12, 1, 5), (None, False), False)]


@pytest.mark.parametrize("plan,shape,epilogue,training", CASES)
def test_channel_blocks_match_float64_and_row_tiles(plan, shape, epilogue, training,
                                                    monkeypatch):
    """Many blocks and splits (many_programs: 64-value tiles), long loops of grouped
    samples and a tail (long_programs), one block per tensor (default): the statistics,
    output, every gradient and the running statistics, against float64 and against the
    same call in row tiles (CHANNEL_BLOCK_MAX_S = 0)."""
    activation, with_residual = epilogue
    x = make_input(shape, torch.float32, "cpu", loc=3.0, scale=2.0)
    w, b, rm, rv = random_params(shape[1], torch.float32, "cpu")
    res = make_input(shape, torch.float32, "cpu", seed=4) if with_residual else None
    with precision.plan_context(plan):
        spans = set()
        runs = []
        for max_s in (triton_plan.CHANNEL_BLOCK_MAX_S, 0):
            monkeypatch.setattr(triton_plan, "CHANNEL_BLOCK_MAX_S", max_s)
            got = []
            spans |= _spans(lambda: got.append(_passes(x, w, b, rm.clone(), rv.clone(), res,
                                                       activation, training)))
            runs.append(got[0][0])
            g = got[0][1]
    assert 0 in spans and len(spans) == 2  # both tilings ran
    want = _reference(x, w, b, rm, rv, res, activation, training, g)
    for blocks, rows, ref in zip(*runs, want):
        scale = ref.abs().max().item() + 1.0
        assert (blocks.double() - ref).abs().max().item() <= 2e-5 * scale
        assert (blocks - rows).abs().max().item() <= 2e-5 * scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_in_channel_blocks_round_once(dtype, monkeypatch):
    """bfloat16 and float16 through channel blocks: the output is the float32 call's,
    rounded once (both compute in float32; with the same Welford states, float32's
    4-lane vectors: the 8-lane ones of a 16-bit input group the sums otherwise)."""
    real = triton_launch.state_vectors
    monkeypatch.setattr(triton_launch, "state_vectors",
                        lambda plan, size, *rest: real(plan, 4, *rest))
    x = make_input((6, 24, 7, 7), torch.float32, "cpu", loc=1.0).to(dtype)
    w, b, rm, rv = random_params(24, torch.float32, "cpu")
    with kernels_only():
        half = []
        assert _spans(lambda: half.append(bnkernels.batch_norm(x, rm.clone(), rv.clone(), w,
                                                               b, training=True))) != {0}
        full = bnkernels.batch_norm(x.float(), rm.clone(), rv.clone(), w, b, training=True)
    assert torch.equal(half[0], full.to(dtype))


def test_int64_indexing_in_channel_blocks(monkeypatch):
    """The INDEX_64 variant of channel blocks gives the same bits; forced on a small tensor."""
    x = make_input((5, 8, 3, 3), torch.float32, "cpu", loc=1.0)
    w, b, rm, rv = random_params(8, torch.float32, "cpu")
    with precision.plan_context("many_programs"):
        narrow, _ = _passes(x, w, b, rm.clone(), rv.clone(), None, None, True)
        real = triton_plan.kernel_layout
        monkeypatch.setattr(triton_launch, "kernel_layout",
                            lambda *a: real(*a)._replace(index_64=True))
        wide = []
        spans = _spans(lambda: wide.append(_passes(x, w, b, rm.clone(), rv.clone(), None,
                                                   None, True)[0]))
    assert spans and 0 not in spans
    for a, b_ in zip(narrow, wide[0]):
        assert torch.equal(a, b_)
