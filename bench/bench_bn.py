"""BatchNorm on ResNet-50's shapes: every provider side by side, in one run, on one GPU.

    python bench/bench_bn.py [--quick] [--out DIR] [--dtypes float32,bfloat16] [--layouts nchw,nhwc]

Providers: bnkernels_triton and bnkernels_cuda (bnkernels.batch_norm with
BNKERNELS_BACKEND=triton / cuda); bnkernels_triton_3k (the Triton backend with its
persistent one-launch pass off: three kernels a training pass, for the comparison; not in
the default list); torch (nn.functional.batch_norm, cuDNN where torch picks
it); torch_native (cuDNN disabled); inductor (torch.compile of the same F.batch_norm call).
Ops: fwd_train (batch statistics + running-stat update), bwd (the backward alone),
fwd_eval, and one `copy` row per run (a device-to-device copy: the bandwidth ceiling).
--ops bnrelu_fwd_train,bnrelu_bwd,bnaddrelu_fwd_train,bnaddrelu_bwd: the fused epilogues
relu(bn(x)) and relu(bn(x) + r), fused in bnkernels_*, separate ops elsewhere.

Timing: triton.testing.do_bench (it flushes L2 before every repetition), median with the
20th/80th percentiles; each provider gets fresh inputs, and its output is checked against
torch before it is timed. GB/s counts 3 tensor sizes for fwd_train, 5 for bwd, 2 for
fwd_eval and copy (the practical floor of docs/math.md).

Rows are appended to DIR/bn.csv (DIR defaults to bench/results/<gpu>/), one line per
(op, layout, dtype, shape, provider), each written as soon as it is measured (a run stopped
part-way keeps its rows), with the device, versions and commit. launches: the device
kernels one timed call runs (torch.profiler's CUDA kernel events; on CPU, --smoke,
bnkernels' own launch counters, and empty for the other providers). floor_ms: the op's
least traffic (LEAST_TENSORS: each input read once, each output written once) over the
run's copy bandwidth.
--smoke runs tiny shapes on CPU with a wall-clock timer: it checks the harness, not speed.

Compiling first, in parallel: a fresh GPU machine compiles every Triton specialisation
(the Triton provider's per shape, dtype and layout) and every Inductor graph (one per op,
dtype and layout) on its first call, one after another, minutes of a timed run's budget.
--compile-jobs J (default: the cores, at most 16, on a GPU) first runs each of them once in
J worker processes (--warm-shard i/J: no timing, no rows); Triton's and Inductor's on-disk
caches then hand the timed process the compiled code.
"""
from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

COLUMNS = ["op", "layout", "dtype", "N", "C", "H", "W", "provider", "median_ms", "p20_ms",
           "p80_ms", "gbps", "launches", "floor_ms", "gpu", "torch", "triton", "cuda", "commit"]
RESNET50_SHAPES = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 56, 56), (128, 28, 28),
                   (512, 28, 28), (256, 28, 28), (256, 14, 14), (1024, 14, 14), (512, 14, 14),
                   (512, 7, 7), (2048, 7, 7)]
QUICK_SHAPES = [(64, 112, 112), (256, 56, 56), (2048, 7, 7)]
PROVIDERS = ["bnkernels_triton", "bnkernels_cuda", "torch", "torch_native", "inductor"]
OPS = ["fwd_train", "bwd", "fwd_eval"]
# Fused epilogues: relu(bn(x)) and relu(bn(x) + r); bnkernels_* run them fused, the
# other providers as torch's separate ops (inductor: torch.compile of those ops).
FUSED_OPS = ["bnrelu_fwd_train", "bnrelu_bwd", "bnaddrelu_fwd_train", "bnaddrelu_bwd"]
# Tensor sizes the fused kernels move (x read twice in training; the residual once more
# per pass, and its gradient written): the GB/s of every provider counts these.
TENSORS_MOVED = {"fwd_train": 3, "bwd": 5, "fwd_eval": 2, "copy": 2,
                 "bnrelu_fwd_train": 3, "bnrelu_bwd": 5, "bnaddrelu_fwd_train": 4,
                 "bnaddrelu_bwd": 8}
# The least traffic of each op (docs/math.md, "The floor"): every input read once, every
# output written once (training forward: x in, y out; backward: x and dy in, dx out; the
# fused epilogues add the residual, or its gradient, and the backward's relu mask is
# recomputed from x). floor_ms = these bytes / the run's copy bandwidth.
LEAST_TENSORS = {"fwd_train": 2, "bwd": 3, "fwd_eval": 2, "copy": 2,
                 "bnrelu_fwd_train": 2, "bnrelu_bwd": 3, "bnaddrelu_fwd_train": 3,
                 "bnaddrelu_bwd": 5}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}


# One torch.compile per function, with dynamic shapes: Inductor compiles once per
# (op, dtype, layout) (its guards), not once per shape.
_COMPILED = {}


def _compiled(fn, fused, with_residual):
    key = (fused, with_residual)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=True)
    return _COMPILED[key]


class _Case:
    """Fresh inputs for one (op, shape, dtype, layout, provider) and the call to time."""

    def __init__(self, op, provider, shape, dtype, layout, device):
        import bnkernels

        n, c, h, w = shape
        fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        gen = torch.Generator(device=device).manual_seed(0)
        self.x = (torch.randn(shape, generator=gen, device=device) * 2 + 0.5).to(dtype)
        self.x = self.x.contiguous(memory_format=fmt)
        self.weight = torch.rand(c, generator=gen, device=device) + 0.5
        self.bias = torch.randn(c, generator=gen, device=device)
        self.rm = torch.randn(c, generator=gen, device=device)
        self.rv = torch.rand(c, generator=gen, device=device) + 0.5
        self.grad = torch.randn(shape, generator=gen, device=device).to(dtype)
        self.grad = self.grad.contiguous(memory_format=fmt)
        training = op != "fwd_eval"
        fused = op.startswith("bn")
        self.residual = None
        if op.startswith("bnaddrelu"):
            self.residual = torch.randn(shape, generator=gen, device=device).to(dtype)
            self.residual = self.residual.contiguous(memory_format=fmt)
        if provider in common.BNKERNELS_PROVIDERS and fused:
            fn = functools.partial(bnkernels.batch_norm, activation="relu",
                                   residual=self.residual)
        elif provider in common.BNKERNELS_PROVIDERS:
            fn = bnkernels.batch_norm
        else:
            fn = functools.partial(_unfused, residual=self.residual) if fused else F.batch_norm
            if provider == "inductor":
                fn = _compiled(fn, fused, self.residual is not None)
        self.provider, self.op = provider, op

        def forward(x):
            return fn(x, self.rm, self.rv, self.weight, self.bias, training, 0.1, 1e-5)

        self.forward = forward
        self.leaves = (self.x, self.weight, self.bias) + (
            (self.residual,) if self.residual is not None else ())
        if op.endswith("bwd"):
            for t in self.leaves:
                t.requires_grad_(True)
            self.y = self._guarded(lambda: forward(self.x))

    def _guarded(self, call):
        if self.provider != "torch_native":
            return call()
        with torch.backends.cudnn.flags(enabled=False):
            return call()

    def timed_call(self):
        if self.op.endswith("bwd"):
            return lambda: self._guarded(lambda: torch.autograd.grad(
                self.y, self.leaves, self.grad, retain_graph=True))
        return lambda: self._guarded(lambda: self.forward(self.x))

    def output(self):
        """What is compared with torch: y, or (dx, dweight, dbias[, dresidual])."""
        if self.op.endswith("bwd"):  # (torch's backward saved the running stats: leave them be)
            return self.timed_call()()
        rm, rv = self.rm.clone(), self.rv.clone()
        out = self.timed_call()()
        self.rm.copy_(rm), self.rv.copy_(rv)
        return (out,)


def _unfused(x, rm, rv, weight, bias, training, momentum, eps, residual=None):
    """torch's separate ops: batch_norm, (add,) relu."""
    y = F.batch_norm(x, rm, rv, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return F.relu(y)


def _time(fn, device):
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return samples[1], samples[0], samples[2]


def _launches(call, device):
    """Device kernels one call of call() runs, after a first call (compiles, plans)."""
    call()
    if device != "cuda":
        from bnkernels import backends

        def launched():
            return sum(sum(backends.get(b).launch_counts().values()) for b in ("triton", "cuda"))
        before = launched()
        call()
        return launched() - before
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return sum(e.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in e.name.lower()
               and "memset" not in e.name.lower() for e in prof.events())


def _check(case, reference, dtype):
    for got, want in zip(case.output(), reference):
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1))
        if err.item() > TOL[dtype]:
            raise AssertionError(f"{case.provider} {case.op}: relative error {err.item():.2e}")


# What compiles on a first call: the Triton backend's kernels (per shape), Inductor's
# graph (per op, dtype and layout, dynamic shapes). cuDNN and csrc/ have nothing to compile.
COMPILING_PROVIDERS = ("bnkernels_triton", "bnkernels_triton_3k", "inductor")


def warm_tasks(jobs, providers) -> list:
    """(job, provider) for every first call that compiles: each Triton job, and one
    Inductor job per (op, layout, dtype); Inductor's first, the longest compiles."""
    inductor, triton = [], []
    seen = set()
    for job in jobs:
        op, layout, dname, _ = job
        if "inductor" in providers and (op, layout, dname) not in seen:
            seen.add((op, layout, dname))
            inductor.append((job, "inductor"))
        triton += [(job, p) for p in providers if p in COMPILING_PROVIDERS and p != "inductor"]
    return inductor + triton


def warm_shard(args, jobs, providers, device, shard: int, shards: int) -> int:
    """One worker of --compile-jobs: the first call of every shard-th warm task."""
    for (op, layout, dname, (c, h, w)), provider in warm_tasks(jobs, providers)[shard::shards]:
        with common.backend_for(provider):
            case = _Case(op, provider, (args.batch, c, h, w), DTYPES[dname], layout, device)
            case.timed_call()()
        del case
    if device == "cuda":
        torch.cuda.synchronize()
    return 0


def compile_in_parallel(argv, jobs_count: int) -> None:
    """Runs this script's warm shards in jobs_count processes and waits for them; a shard
    that fails only costs the timed run its compile time (the timed run reports errors)."""
    start = time.monotonic()
    workers = [subprocess.Popen([sys.executable, __file__, *argv, "--compile-jobs", "0",
                                 "--warm-shard", f"{i}/{jobs_count}"])
               for i in range(jobs_count)]
    failed = sum(w.wait() != 0 for w in workers)
    print(f"compiled in {jobs_count} processes in {time.monotonic() - start:.0f} s"
          + (f" ({failed} failed)" if failed else ""), flush=True)


def _jobs(args, shapes):
    return [(op, layout, dname, chw) for op in args.ops.split(",") if op
            for layout in args.layouts.split(",") for dname in args.dtypes.split(",")
            for chw in shapes]


def run(args, emit) -> int:
    """Times every job; emit(row) writes each row as soon as it is measured (a run stopped
    part-way keeps what it measured). Returns the rows written."""
    device = "cpu" if args.smoke else "cuda"
    if device == "cpu":
        common.emulate_on_cpu()
    shapes = [(4, 6, 6), (8, 3, 3)] if args.smoke else (
        QUICK_SHAPES if args.quick else RESNET50_SHAPES)
    providers = [p for p in args.providers.split(",") if p]
    jobs = _jobs(args, shapes)
    if args.warm_shard:
        shard, shards = (int(v) for v in args.warm_shard.split("/"))
        return warm_shard(args, jobs, providers, device, shard, shards)
    meta = dict(gpu=common.device_name(device), torch=torch.__version__,
                triton=common.triton_version(), cuda=torch.version.cuda or "none",
                commit=common.commit())
    written = 0
    copy_src = torch.empty(2**28 if device == "cuda" else 2**16, device=device)
    copy_dst = torch.empty_like(copy_src)
    med, p20, p80 = _time(functools.partial(copy_dst.copy_, copy_src), device)
    nbytes = 2 * copy_src.numel() * copy_src.element_size()
    bytes_per_ms = nbytes / med  # the run's copy bandwidth: every floor_ms divides by it
    emit(dict(op="copy", layout="-", dtype="float32", N=copy_src.numel(), C=1, H=1, W=1,
              provider="torch", median_ms=med, p20_ms=p20, p80_ms=p80,
              gbps=nbytes / med / 1e6, launches=1, floor_ms=med, **meta))
    written += 1
    del copy_src, copy_dst
    try:  # a progress bar where tqdm is installed; a line per job either way
        from tqdm import tqdm
        progress = tqdm(total=len(jobs), desc="bench_bn", file=sys.stderr)
    except ImportError:
        progress = None
    for i, (op, layout, dname, (c, h, w)) in enumerate(jobs, 1):
        dtype = DTYPES[dname]
        shape = (args.batch, c, h, w)
        reference = _Case(op, "torch", shape, dtype, layout, device).output()
        timed = []
        for provider in providers:
            with common.backend_for(provider):
                case = _Case(op, provider, shape, dtype, layout, device)
                _check(case, reference, dtype)
                med, p20, p80 = _time(case.timed_call(), device)
                launched = (_launches(case.timed_call(), device)
                            if device == "cuda" or provider in common.BNKERNELS_PROVIDERS
                            else "")
            size = case.x.numel() * case.x.element_size()
            emit(dict(op=op, layout=layout, dtype=dname, N=shape[0], C=c, H=h, W=w,
                      provider=provider, median_ms=med, p20_ms=p20, p80_ms=p80,
                      gbps=TENSORS_MOVED[op] * size / med / 1e6, launches=launched,
                      floor_ms=LEAST_TENSORS[op] * size / bytes_per_ms, **meta))
            written += 1
            timed.append(f"{provider} {med:.3f} ms")
            del case
        print(f"[{i}/{len(jobs)}] {op} {layout} {dname} {shape}: " + ", ".join(timed),
              flush=True)
        if progress is not None:
            progress.update()
    if progress is not None:
        progress.close()
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="three shapes instead of twelve")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: harness check")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--layouts", default="nchw,nhwc")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--ops", default=",".join(OPS),
                        help="comma list of " + ", ".join(OPS + FUSED_OPS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--compile-jobs", type=int, default=None,
                        help="processes that compile first (default: the cores, at most "
                        "16, on a GPU; 0 under --smoke)")
    parser.add_argument("--warm-shard", default="", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    unknown = {op for op in args.ops.split(",") if op} - set(OPS + FUSED_OPS)
    if unknown:
        raise SystemExit(f"unknown --ops {sorted(unknown)}; choose from {OPS + FUSED_OPS}")
    if args.smoke:
        args.batch = min(args.batch, 2)
        args.providers = args.providers.replace("inductor", "").replace(",,", ",").strip(",")
    elif not torch.cuda.is_available():
        print("bench_bn.py times on a CUDA GPU; there is none here (use --smoke to check "
              "the harness, or `python -m bnkernels.selfcheck` for correctness).")
        return 2
    if args.warm_shard:
        return run(args, None)
    jobs_count = args.compile_jobs
    if jobs_count is None:
        jobs_count = 0 if args.smoke else min(os.cpu_count() or 1, 16)
    if jobs_count > 1:
        compile_in_parallel(argv, jobs_count)
    path = common.results_path(args.out, "cpu" if args.smoke else "cuda", "bn.csv")
    with common.csv_rows(path, COLUMNS) as emit:
        written = run(args, emit)
    print(f"{written} rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
