"""The hard cases: |mean| >> std, outliers, float16 overflow, constant channels, N*S = 1,
empty batches, inf/NaN and |x| near 1e19, bfloat16 rounding, determinism, and the
split-and-merge path with many programs per channel."""
import contextlib
import sys
from pathlib import Path

import pytest
import torch

import bnkernels
from bnkernels.backends.triton import plan as triton_plan
from helpers import (TOL, assert_close_scaled, bn_pair, float64_reference, kernels_only,
                     make_input, random_params)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import precision  # noqa: E402

# Every test here runs on each kernel backend: Triton and the CUDA C++ of csrc/.
pytestmark = pytest.mark.usefixtures("kernel_backend")


@pytest.fixture
def many_splits():
    """Tiny tiles and many programs (Triton), many blocks with few rows each (CUDA C++):
    every channel is split, so the Welford merge across programs and the masked tails are
    exercised (bench/precision.py measures with the same plan)."""
    with precision.many_programs():
        yield


def _fwd_bwd(x, w, b, rm, rv, training=True):
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    b = b.detach().requires_grad_(True)
    g = make_input(x.shape, x.dtype, x.device, seed=5)
    with kernels_only():
        y = bnkernels.batch_norm(x, rm, rv, w, b, training=training)
        grads = torch.autograd.grad(y, (x, w, b), g)
    return (y,) + grads


@pytest.mark.parametrize("channels_last", [False, True])
def test_split_merge_matches_single_program(channels_last, device, monkeypatch):
    x = make_input((3, 5, 13, 11), torch.float32, device,
                   "channels_last" if channels_last else "contiguous", loc=2.0)
    params = random_params(5, torch.float32, device)
    rm1, rv1, rm2, rv2 = (t.clone() for t in params[2:] * 2)
    one = _fwd_bwd(x, *params[:2], rm1, rv1)
    plan = triton_plan.launch_plan(3, 5, 143, channels_last, torch.device(device))
    monkeypatch.setattr(triton_plan, "INTERPRETER_TILE", 64)
    monkeypatch.setattr(triton_plan, "GPU_TILE", 64)
    monkeypatch.setattr(triton_plan, "INTERPRETER_PROGRAMS", 64)
    split_plan = triton_plan.launch_plan(3, 5, 143, channels_last, torch.device(device))
    assert split_plan.splits > 1 and split_plan.splits > plan.splits
    many = _fwd_bwd(x, *params[:2], rm2, rv2)
    for a, b in zip(one + (rm1, rv1), many + (rm2, rv2)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", ["default_plan", "many_programs", "long_programs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_mean_small_std(dtype, split, device):
    """x = 1e4 + randn: E[x^2] - E[x]^2 would lose every digit of the variance in float32."""
    x = make_input((8, 3, 16, 16), dtype, device, loc=1e4, scale=1.0)
    rm, rv = torch.zeros(3, device=device, dtype=dtype), torch.ones(3, device=device, dtype=dtype)
    with kernels_only(), precision.plan_context(split):
        y = bnkernels.batch_norm(x, rm, rv, training=True, momentum=1.0)
    x64 = x.double()
    var64 = x64.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(rv.double(), var64, rtol=1e-5 if dtype == torch.float32 else 1e-10,
                               atol=0)
    torch.testing.assert_close(rm.double(), x64.mean(dim=(0, 2, 3)), rtol=1e-7, atol=0)
    # (x - mean) carries the float32 rounding of a mean of 1e4: about 5e-4.
    expected = float64_reference(x, None, None, None, None, True)[0]
    tol = 2e-3 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=tol)


def test_float16_large_values_do_not_overflow(device, many_splits):
    """|x| ~ 1000 in float16: x^2 ~ 1e6 is past float16's 65504; statistics are float32."""
    x = make_input((4, 3, 16, 16), torch.float16, device, loc=1000.0, scale=30.0)
    w, b, rm, rv = random_params(3, torch.float32, device)
    y, dx, dw, db = _fwd_bwd(x, w, b, rm, rv)
    for t in (y, dx, dw, db, rm, rv):
        assert torch.isfinite(t).all()
    expected = float64_reference(x, w, b, None, None, True)[0]
    assert_close_scaled(y, expected, TOL[torch.float16])
    torch.testing.assert_close(rv.double(), 0.9 * 0.5 + 0.0 + 0.1 * x.double().var(dim=(0, 2, 3)),
                               rtol=0.5, atol=0)  # coarse: the exact value is checked below
    ref, ours = bn_pair(4, 3, torch.float32, device)
    with kernels_only():
        ours(x)
    ref(x)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_constant_channel_gives_beta(dtype, device):
    x = make_input((4, 3, 5, 7), dtype, device)
    x[:, 1] = 3.75
    w, b, rm, rv = random_params(3, torch.float32, device)
    y, dx, dw, db = _fwd_bwd(x, w, b, rm, rv)
    for t in (y, dx, dw, db, rm, rv):
        assert torch.isfinite(t).all()
    # y is beta rounded to the output dtype; the batch variance of the channel is 0
    torch.testing.assert_close(y[:, 1], b[1].to(dtype).expand(4, 5, 7), rtol=0, atol=1e-3)
    assert rv[1].item() == pytest.approx(0.9 * random_params(3, torch.float32, device)[3][1].item())


def test_one_value_per_channel_in_eval(device):
    """N*S = 1 is allowed in eval mode (running statistics)."""
    ref, ours = bn_pair(2, 4, torch.float32, device)
    ref.eval(), ours.eval()
    x = make_input((1, 4), torch.float32, device)
    with kernels_only():
        y = ours(x)
    torch.testing.assert_close(y, ref(x))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4), (0, 3, 2, 2, 2)])
def test_empty_batch_like_torch(shape, training, device):
    ref, ours = bn_pair(len(shape), 3, torch.float32, device)
    ref.train(training), ours.train(training)
    results = []
    for module in (ref, ours):
        x = torch.empty(shape, device=device, requires_grad=True)
        y = module(x)
        y.sum().backward()
        results.append((y, x.grad, module.weight.grad, module.bias.grad,
                        module.running_mean, module.running_var, module.num_batches_tracked))
    for a, b in zip(*results):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)


def test_deterministic_bitwise(device, many_splits):
    x = make_input((4, 6, 9, 9), torch.float32, device, "channels_last", loc=3.0)
    params = random_params(6, torch.float32, device)
    runs = []
    for _ in range(2):
        rm, rv = params[2].clone(), params[3].clone()
        runs.append(_fwd_bwd(x, params[0], params[1], rm, rv) + (rm, rv))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_int64_indexing_path(device, monkeypatch):
    """The INDEX_64 variant gives the same results; forced here on a small tensor."""
    x = make_input((3, 4, 6, 5), torch.float32, device, "channel_slice", loc=1.0)
    params = random_params(4, torch.float32, device)
    rm1, rv1, rm2, rv2 = (t.clone() for t in params[2:] * 2)
    narrow = _fwd_bwd(x, *params[:2], rm1, rv1)
    real = triton_plan.kernel_layout
    monkeypatch.setattr("bnkernels.backends.triton.launch.kernel_layout",
                        lambda *a: real(*a)._replace(index_64=True))
    wide = _fwd_bwd(x, *params[:2], rm2, rv2)
    for a, b in zip(narrow + (rm1, rv1), wide + (rm2, rv2)):
        assert torch.equal(a, b)


def test_int64_chosen_past_2_to_31():
    big = torch.empty((2**16, 64, 32, 32), device="meta")
    assert triton_plan.kernel_layout([big], 4, 512).index_64
    small = torch.empty((128, 64, 56, 56), device="meta")
    assert not triton_plan.kernel_layout([small], 4, 512).index_64


# ---------------------------------------------------------------- precision, non-finite

# float32 statistics against float64 wherever the outliers are, within 4 float32 ulps:
# the mean's error relative to the data's RMS sqrt(mean^2 + var) (a mean near 0 has no
# relative precision of its own), the variance's relative to the variance. The inputs and
# the measure are bench/precision.py's, whose figures (with torch's) the README states.
STAT_RTOL = 4 * 2.0**-24


@pytest.mark.parametrize("split", list(precision.SIZES))
@pytest.mark.parametrize("channels_last", [False, True])
def test_statistics_as_accurate_as_float32_allows(split, channels_last, device):
    with precision.plan_context(split):
        _assert_statistics_accurate(split, channels_last, device)


def _assert_statistics_accurate(split, channels_last, device):
    for name, x in precision.stat_inputs(device, precision.SIZES[split]).items():
        if channels_last:
            x = x.unsqueeze(-1).contiguous(memory_format=torch.channels_last)
        with kernels_only():
            mean, var = torch.ops.bnkernels.batch_norm_stats(x)
        mean_err, var_err = precision.stat_errors(mean, var, x)
        assert mean_err <= STAT_RTOL and var_err <= STAT_RTOL, (name, mean_err, var_err)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_input_gives_torch_statistics(value, device):
    x = make_input((4, 3, 5), torch.float32, device)
    x[1, 0, 2] = value  # channel 0: one non-finite value
    x[2, 1, 0], x[3, 1, 1] = float("inf"), float("-inf")  # channel 1: both infinities
    results = []
    for fn, guard in ((torch.nn.functional.batch_norm, contextlib.nullcontext()),
                      (bnkernels.batch_norm, kernels_only())):
        rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
        with guard:
            y = fn(x, rm, rv, training=True)
        results.append((y, rm, rv))
    for a, e in zip(results[1], results[0]):
        torch.testing.assert_close(a, e, equal_nan=True)


def test_values_near_the_top_of_float32_range(device):
    """|x| ~ 1e19: the float64 variance (~1e38) still fits float32; M2 = n * var does not."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(8, 3, 50, generator=gen, dtype=torch.float64) * 1e19).float().to(device)
    with kernels_only():
        y = bnkernels.batch_norm(x, None, None, training=True)
    assert y.isfinite().all()
    expected = torch.nn.functional.batch_norm(x.double(), None, None, training=True)
    # torch's own float32 result is off by up to ~3 here: ours may be no worse
    torch_err = (torch.nn.functional.batch_norm(x, None, None, training=True).double()
                 - expected).abs().max()
    assert (y.double() - expected).abs().max() <= max(torch_err, 1e-5)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("training", [True, False])
def test_non_finite_weight_gives_torch_pattern(value, training, device):
    x = make_input((4, 3, 5), torch.float32, device, loc=0.2)
    w, b, rm, rv = random_params(3, torch.float32, device)
    w[1] = value
    expected = torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training)
    with kernels_only():
        y = bnkernels.batch_norm(x, rm.clone(), rv.clone(), w, b, training)
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.isinf(), expected.isinf())
    torch.testing.assert_close(y, expected, equal_nan=True)


@pytest.mark.parametrize("training", [True, False])
def test_bfloat16_output_is_rounded_to_nearest(training, device):
    """The bfloat16 result is the float32 result rounded to nearest even, bit for bit:
    both runs compute the same float32 values (same plan, bf16 loads are exact), so this
    holds on a GPU and, through conftest's patch, under the interpreter (which truncates)."""
    x = make_input((4, 6, 7, 5), torch.bfloat16, device, loc=0.4, scale=3.0)
    w, b, rm, rv = random_params(6, torch.float32, device)
    with kernels_only():
        y16 = bnkernels.batch_norm(x, rm.clone(), rv.clone(), w, b, training)
        y32 = bnkernels.batch_norm(x.float(), rm.clone(), rv.clone(), w, b, training)
    assert torch.equal(y16.view(torch.int16), y32.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("channels_last", [False, True])
def test_long_programs_plan_takes_whole_groups_and_a_tail(channels_last):
    """What long_programs exercises in the Triton forward loop: splits of whole groups of
    GROUP_TILES tiles (_group_update) and, in the last split, tiles past the last group."""
    with precision.plan_context("long_programs"):
        for n, s in precision.SIZES["long_programs"]:
            plan = triton_plan.launch_plan(n, 2, s, channels_last, torch.device("cpu"))
            group_rows = triton_plan.GROUP_TILES * plan.block_r
            assert plan.rows_per_split % group_rows == 0
            assert (n * s) % plan.rows_per_split % group_rows != 0  # a tail
