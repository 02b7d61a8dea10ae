"""Differential fuzzing (hypothesis) of bnkernels.batch_norm through the plans a GPU takes,
on both kernel backends, against the plain-torch reference in float64.

Why beside test_fuzz_differential: its tensors (at most 4 x 6 x 5^3) fit one tile, so its
launches never split a channel over programs. Here the shapes reach 2^17 values and the
plans are the GPU's: the Triton backend's 2048-value tiles (GPU_TILE) over a grid of 1, 37
or 264 programs (an H100's two per SM), its persistent pass on or off, and csrc/'s
emulation over 1 to 4096 blocks of 64 or 256 threads. So a random shape crosses tiles,
splits, channel blocks (7 x 7, 14 x 14), the forward loop's groups and tails, and the
merge, in every layout, dtype, fused epilogue and autograd mode, with weight, bias and
the running statistics as views (helpers.CHANNEL_VIEWS) read and written through their
strides.

SyncBatchNorm's path (local statistics, the merge, normalizing with the merged ones, the
input gradient from reduced sums) takes the same plans with 2 to 4 ranks simulated in one
process, against BatchNorm on the whole batch.

Two limits of float32 that no kernel escapes set the tolerances beside helpers.TOL:
 - the batch mean is a float32 value: where max|x| is many times the channel's spread,
   its rounding (4 ulps of max|x|) is that many ulps of the spread in y;
 - relu's kink: where z rounds to the other side of 0 than float64's z, the gradient
   passes where the exact one stops. The reference takes the kernel's side (y > 0) there;
   y itself is compared in full.
"""
import os

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnkernels
from bnkernels import sync_batch_norm
from bnkernels.backends import reference
from bnkernels.backends.cuda import plan as cuda_plan
from bnkernels.backends.triton import persistent_plan
from bnkernels.backends.triton import plan as triton_plan
from helpers import (CHANNEL_VIEWS, GRAD_TOL, LAYOUTS, TOL, assert_close_scaled,
                     channel_view, channel_view_of, kernels_only, layout_applies,
                     make_input)

# On a GPU every other test takes these plans, compiled; this one puts them through the
# interpreter and the emulation build, which a GPU machine does not run.
pytestmark = [pytest.mark.usefixtures("kernel_backend"),
              pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="on a GPU the other tests run its plans, compiled")]

# (sizes from large to small: hypothesis starts with the first values of each list)
SIDES = [28, 14, 7, 31, 13, 16, 5, 3, 2, 1]
MOST_VALUES = 2**17
# input dtype -> the parameter dtypes torch accepts with it
DTYPE_MIXES = {torch.float32: [torch.float32], torch.float64: [torch.float64],
               torch.float16: [torch.float16, torch.float32],
               torch.bfloat16: [torch.bfloat16, torch.float32]}


@st.composite
def cases(draw):
    dim = draw(st.sampled_from([4, 2, 3, 5, 4]))
    sides = st.sampled_from(SIDES if dim < 5 else SIDES[1:3] + SIDES[6:])
    shape = [draw(st.sampled_from([8, 33, 16, 3, 2, 1])),
             draw(st.sampled_from([64, 17, 256, 96, 16, 3, 1]))]
    shape += [draw(sides) for _ in range(dim - 2)]
    while torch.Size(shape).numel() > MOST_VALUES:
        shape[0 if shape[0] > 1 else 1] //= 2
    training = draw(st.booleans())
    if training and shape[0] * torch.Size(shape[2:]).numel() == 1:
        shape[0] = 2
    dtype = draw(st.sampled_from(list(DTYPE_MIXES)))
    return dict(
        shape=shape, training=training, dtype=dtype,
        pdtype=draw(st.sampled_from(DTYPE_MIXES[dtype])),
        layout=draw(st.sampled_from([l for l in LAYOUTS if layout_applies(l, dim)])),
        activation=draw(st.sampled_from([None, "relu", "silu", "gelu"])) if dim > 2 else None,
        residual=draw(st.booleans()), affine=draw(st.booleans()),
        # (mean, spread): |mean| >> std included
        loc_scale=draw(st.sampled_from([(0.0, 1.0), (3.0, 0.5), (-30.0, 2.0), (100.0, 0.05),
                                        (0.0, 50.0)])),
        mode=draw(st.sampled_from(["backward", "backward", "forward_ad", "double_backward"])),
        programs=draw(st.sampled_from([264, 37, 1])),
        persistent=draw(st.sampled_from(["off", "on"])),
        cuda_blocks=draw(st.sampled_from([1, 7, 64, 4096])),
        cuda_threads=draw(st.sampled_from([64, 256])),
        cuda_rows_per_lane=draw(st.sampled_from([1, 4])),
        seed=draw(st.integers(0, 2**16)),
        # how weight, bias and the running statistics lie in memory (helpers.channel_view)
        channel_view=draw(st.sampled_from(CHANNEL_VIEWS)))


def _gpu_plans(case, monkeypatch):
    monkeypatch.setattr(triton_plan, "INTERPRETER_TILE", triton_plan.GPU_TILE)
    monkeypatch.setattr(triton_plan, "INTERPRETER_PROGRAMS", case["programs"])
    monkeypatch.setattr(persistent_plan, "MODE", case["persistent"])
    monkeypatch.setattr(cuda_plan, "EMULATED_BLOCKS", case["cuda_blocks"])
    monkeypatch.setattr(cuda_plan, "EMULATED_BLOCK_THREADS", case["cuda_threads"])
    monkeypatch.setattr(cuda_plan, "CUDA_MIN_ROWS_PER_LANE", case["cuda_rows_per_lane"])


def _inputs(case):
    shape, dtype, pdtype = case["shape"], case["dtype"], case["pdtype"]
    loc, scale = case["loc_scale"]
    gen = torch.Generator().manual_seed(case["seed"])

    def rand(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    x = make_input(shape, dtype, "cpu", case["layout"], loc=loc, scale=scale, seed=case["seed"])
    c = shape[1]
    params = dict(weight=(rand(c).abs() + 0.5).to(pdtype), bias=rand(c).to(pdtype),
                  running_mean=rand(c).to(pdtype), running_var=(rand(c).abs() + 0.5).to(pdtype))
    # weight and bias as views (read through their strides); the running statistics,
    # written, are made views by the test that writes them
    for name in ("weight", "bias"):
        params[name] = channel_view_of(case["channel_view"], params[name])[0]
    if not case["affine"]:
        params["weight"] = params["bias"] = None
    residual = rand(*shape).to(dtype) if case["residual"] else None
    # the mode's seeds: the output's gradient, the tangents, the double backward's v
    extra = [rand(*shape).to(dtype) for _ in range(2)] + [rand(c).to(pdtype) for _ in range(2)]
    return x, params, residual, extra


def _derivatives(fn, case, x, params, residual, extra):
    """y and the mode's derivatives with respect to (x, weight, bias, residual) present;
    fn(x, weight, bias, residual) -> y."""
    leaves = [x, params["weight"], params["bias"], residual]
    # leaves that keep the layouts (a copy of a sliced or expanded view would be dense)
    wrt = [t.detach().requires_grad_() for t in leaves if t is not None]
    it = iter(wrt)
    args = [None if t is None else next(it) for t in leaves]
    g, v, tangent_w, tangent_b = extra
    if case["mode"] == "forward_ad":
        tangents = [g if t.dim() > 1 else (tangent_w if t is args[1] else tangent_b)
                    for t in wrt]
        with fwAD.dual_level():
            # (make_dual writes the tangent in the primal's layout: not stride 0)
            duals = iter([fwAD.make_dual(t if 0 not in t.stride() else t.contiguous(),
                                         tt.to(t.dtype)) for t, tt in zip(wrt, tangents)])
            out = fn(*[None if t is None else next(duals) for t in args])
            unpacked = fwAD.unpack_dual(out)
            return unpacked.primal, [unpacked.tangent]
    y = fn(*args)
    second = case["mode"] == "double_backward"
    derivs = torch.autograd.grad(y, wrt, g.to(y.dtype), create_graph=second, allow_unused=True)
    if second and derivs[0].requires_grad:  # d/d(x, w, b, residual) of <dx, v>, a
        # gradient penalty's (none where dx is constant: eval without weight)
        derivs = torch.autograd.grad((derivs[0] * v.to(y.dtype)).sum(), wrt, allow_unused=True)
    elif second:
        derivs = [None] * len(wrt)
    return y, [torch.zeros_like(t) if d is None else d for d, t in zip(derivs, wrt)]


def _check_close(case, x, params, training, y, y64, derivs, derivs64):
    """y and each derivative against float64, on the scales that float32 sets."""
    xs = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    spread = (xs.var(1, correction=0) if training
              else params["running_var"].double()) + 1e-5
    ulps = 2.0**-53 if case["dtype"] == torch.float64 else 2.0**-24
    gamma = 1.0 if params["weight"] is None else params["weight"].double().abs().max().item()
    # the float32 mean's rounding, in units of the spread: 4 ulps of max|x|
    mean_error = (4 * ulps * xs.abs().amax(1) / spread.sqrt()).max().item() if training else 0.0
    atol, rtol = TOL[case["dtype"]]
    assert y.dtype == case["dtype"]
    assert_close_scaled(y, y64, (atol + max(1.0, gamma) * mean_error, rtol), msg="output")
    # Derivatives: on the scale of the terms they cancel (test_fuzz_differential's); the
    # sums over a channel's rows on that scale times the square root of their count. The
    # mean's rounding moves xhat, and so each term, by mean_error of its size.
    order = 2 if case["mode"] == "double_backward" else 1
    terms = (max(1.0, gamma) * spread.rsqrt().max().item() ** order
             * (1 + y64.detach().abs().max().item()))
    atol, rtol = GRAD_TOL[case["dtype"]]
    tol = (8 * atol + 2 * mean_error, 8 * rtol)
    for i, (d, e) in enumerate(zip(derivs, derivs64)):
        msg = f"{case['mode']}, derivative {i}"
        # past the dtype's range (a constant channel's second derivatives, of size 1/eps,
        # in float16): the infinity of the exact value's sign; the rest compared
        beyond = e.to(d.dtype).isinf()
        assert torch.equal(d[beyond].double(), e.to(d.dtype)[beyond].double()), msg
        scale = terms * (xs.shape[1] ** 0.5 if e.dim() == 1 else 1.0)
        assert_close_scaled(d[~beyond], e[~beyond], tol, msg=msg, scale=scale)


def _check_running_stats(case, x, params, momentum, stats):
    """stats (running_mean, running_var) after one training step on x, against float64."""
    want = {k: params[k].double().clone() for k in stats}
    F.batch_norm(x.double(), want["running_mean"], want["running_var"], training=True,
                 momentum=1.0 if momentum is None else momentum)  # None: the first step's 1/1
    for name, value in stats.items():
        assert_close_scaled(value, want[name], TOL[case["pdtype"]], msg=name)


# CI draws the same 24 examples each run (a red run is reproducible);
# BNKERNELS_FUZZ_EXAMPLES=N draws N fresh ones.
FRESH_EXAMPLES = int(os.environ.get("BNKERNELS_FUZZ_EXAMPLES", "0"))


@settings(max_examples=FRESH_EXAMPLES or 24, derandomize=not FRESH_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=cases())
def test_gpu_plans_against_float64(case, monkeypatch):
    _gpu_plans(case, monkeypatch)
    x, params, residual, extra = _inputs(case)
    training, momentum = case["training"], 0.3
    # the running statistics as views too (expanded ones only where nothing writes them)
    kind = "contiguous" if training and case["channel_view"] == "expanded" \
        else case["channel_view"]
    stats, bases = {}, {}
    for k in ("running_mean", "running_var"):
        stats[k], bases[k] = channel_view_of(kind, params[k])
    bases_before = {k: base.clone() for k, base in bases.items()}
    params.update({k: view.clone() for k, view in stats.items()})  # (the values they hold)

    def ours(x_, w, b, r):
        return bnkernels.batch_norm(x_, stats["running_mean"], stats["running_var"], w, b,
                                    training, momentum, activation=case["activation"],
                                    residual=r)

    with kernels_only():
        y, derivs = _derivatives(ours, case, x, params, residual, extra)
    on_kernel_side = (y > 0).detach()  # relu's kink: the side the kernel took

    def exact(x_, w, b, r):
        y64 = reference.forward(x_, w, b, params["running_mean"].double(),
                                params["running_var"].double(), training, 1e-5,
                                None if case["activation"] == "relu" else case["activation"],
                                r)[0]
        return y64 * on_kernel_side if case["activation"] == "relu" else y64

    as64 = {k: None if t is None else t.double() for k, t in params.items()}
    y64, derivs64 = _derivatives(exact, case, x.double(), as64,
                                 None if residual is None else residual.double(),
                                 [t.double() for t in extra])
    _check_close(case, x, params, training, y, y64, derivs, derivs64)
    if training:
        _check_running_stats(case, x, params, momentum, stats)
    for k, base in bases.items():  # written through the view (training only), nowhere else
        expected = bases_before[k]
        if training:
            channel_view(kind, expected, x.shape[1]).copy_(stats[k])
        assert torch.equal(base, expected), f"{k}: its base changed outside the view"


class _SimulatedRanks:
    """torch.distributed as SyncBatchNorm calls it, for `world` ranks that run one after
    another in this process. A collective that not every rank has reached yet returns the
    caller's own part (a rehearsal, whose results are thrown away) and keeps it; once every
    rank's part is kept, each call returns them all (all_gather), or their sum in rank
    order (all_reduce)."""

    def __init__(self, world):
        self.world, self.rank = world, 0
        self.parts = {"all_gather": {}, "all_reduce": {}}

    def is_available(self):
        return True

    is_initialized = is_available

    def get_world_size(self, group=None):
        return self.world

    def _exchange(self, op, part):
        kept = self.parts[op]
        if len(kept) < self.world:
            kept[self.rank] = part.clone()
            return [part] * self.world
        # the kernels are deterministic: a rank sends again what it sent in the rehearsal
        assert torch.equal(kept[self.rank], part), f"rank {self.rank}: another {op} part"
        return [kept[r] for r in range(self.world)]

    def all_gather(self, out, part, group=None):
        for o, p in zip(out, self._exchange("all_gather", part)):
            o.copy_(p)

    def all_reduce(self, part, group=None):
        parts = self._exchange("all_reduce", part)
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        part.copy_(total)


@st.composite
def sync_cases(draw):
    case = draw(cases())
    case.update(training=True, mode="backward", activation=None, residual=False,
                momentum=draw(st.sampled_from([0.3, None])))
    if case["shape"][0] * torch.Size(case["shape"][2:]).numel() == 1:
        case["shape"][0] = 2
    n = case["shape"][0]
    # each rank's first sample; empty and uneven local batches included
    cuts = sorted(draw(st.lists(st.integers(0, n), min_size=1, max_size=3)))
    case["bounds"] = [0] + cuts + [n]
    return case


@settings(max_examples=FRESH_EXAMPLES or 12, derandomize=not FRESH_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=sync_cases())
def test_sync_batch_norm_over_simulated_ranks(case, monkeypatch):
    """SyncBatchNorm's per-rank kernels (local statistics, normalize with the merged ones,
    local gradient sums, input gradient from the reduced sums) through the GPU's plans, with
    2 to 4 ranks simulated in this process, against BatchNorm on the whole batch in float64."""
    _gpu_plans(case, monkeypatch)
    x, params, _, extra = _inputs(case)
    bounds = case["bounds"]
    ranks = _SimulatedRanks(len(bounds) - 1)
    monkeypatch.setattr(sync_batch_norm, "dist", ranks)

    def rank_module():
        m = bnkernels.SyncBatchNorm(x.shape[1], affine=case["affine"],
                                    momentum=case["momentum"]).to(case["pdtype"])
        m.load_state_dict({k: v for k, v in params.items() if v is not None}, strict=False)
        return m

    def each_rank(step):
        return [step(r, x[a:b], extra[0][a:b]) for r, (a, b) in enumerate(zip(bounds, bounds[1:]))]

    def forward(r, x_r, g_r):
        ranks.rank = r
        module = rank_module()
        leaf = x_r.detach().requires_grad_()  # (keeps the view's strides)
        return module, [leaf] + [p for p in (module.weight, module.bias) if p is not None], \
            module(leaf), g_r

    def backward(r, state, retain):
        ranks.rank = r
        _, wrt, y, g_r = state
        return torch.autograd.grad(y, wrt, g_r, retain_graph=retain)

    with kernels_only():
        each_rank(forward)  # the rehearsal: every rank's statistics kept
        states = each_rank(forward)
        for r, state in enumerate(states):  # the rehearsal: every rank's gradient sums kept
            backward(r, state, retain=True)
        grads = [backward(r, state, retain=False) for r, state in enumerate(states)]
    y = torch.cat([state[2] for state in states])
    # dx from each rank's part; dweight and dbias summed over ranks, as DDP does
    derivs = [torch.cat([g[0] for g in grads])] + [
        sum(g[i].double() for g in grads) for i in range(1, len(grads[0]))]

    def exact(x_, w, b, r):
        return reference.forward(x_, w, b, None, None, True, 1e-5, None, None)[0]

    as64 = {k: None if t is None else t.double() for k, t in params.items()}
    y64, derivs64 = _derivatives(exact, case, x.double(), as64, None,
                                 [t.double() for t in extra])
    _check_close(case, x, params, True, y, y64, derivs, derivs64)
    for module, *_ in states:
        _check_running_stats(case, x, params, case["momentum"],
                             {k: getattr(module, k) for k in ("running_mean", "running_var")})
