"""Host time per call on small shapes, where launching is the whole cost: triton, cuda, torch.

    python bench/bench_launch.py [--out DIR] [--calls 2000] [--smoke | --cpu]

Shapes: N = 1 and 8 at 7x7 (C = 512, 2048) and 14x14 (C = 256, 1024), ResNet-50's late
stages, bfloat16, NCHW. Ops: fwd_eval (inference), fwd_train, train_step (forward and
backward). Providers:
  bnkernels_triton, bnkernels_cuda   bnkernels.batch_norm with BNKERNELS_BACKEND=triton /
                                     cuda: what a user's call costs (checks, custom op, launch)
  launch_triton, launch_cuda         below the custom op (fwd_* only): ops.run_forward, the
                                     shared set-up and the backend's launcher
  torch                              torch.nn.functional.batch_norm (cuDNN)

Host time: time.perf_counter_ns around each call, not waiting for the GPU (median,
20th/80th percentiles over --calls calls after warm-up). The providers of a shape take
turns, ROUNDS rounds of --calls / ROUNDS calls each, so a slow phase of the machine falls
on all of them alike. The queue is drained (synchronize)
every 50 calls, outside the timed region, so a slow GPU never blocks a launch.
Rows are appended to DIR/launch.csv (default bench/results/<gpu>/), with the device,
versions and commit. --smoke: tiny run on CPU (interpreter / emulation), checks the harness.

--cpu: the host path on this machine, no GPU needed. CPU tensors take the Triton backend's
GPU host path (launch plan, argument binding, the pre-bound compiled-kernel launch), with
the compiled kernel replaced by one whose launch, the driver call, does nothing; beside it
torch.nn.functional.batch_norm on the same tiny CPU tensors (where its own compute is a
few hundred elements). float32, shapes CPU_SHAPES; rows go to DIR/launch.csv (default
bench/results/cpu/). Providers: bnkernels_triton, launch_triton, torch.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

COLUMNS = ["op", "dtype", "N", "C", "H", "W", "provider", "host_us_median", "host_us_p20",
           "host_us_p80", "calls", "gpu", "torch", "triton", "cuda", "commit"]
SHAPES = [(n, c, hw, hw) for n in (1, 8) for c, hw in ((512, 7), (2048, 7), (256, 14),
                                                       (1024, 14))]
CPU_SHAPES = [(2, 8, 3, 3), (8, 8, 7, 7)]
OPS = ["fwd_eval", "fwd_train", "train_step"]
PROVIDERS = ["bnkernels_triton", "bnkernels_cuda", "launch_triton", "launch_cuda", "torch"]
CPU_PROVIDERS = ["bnkernels_triton", "launch_triton", "torch"]
SYNC_EVERY = 50
ROUNDS = 10  # the providers take turns (_host_times_us)


def _call(op, provider, shape, dtype, device):
    """The function to time (no arguments), or None where the provider has no such op."""
    import bnkernels
    from bnkernels import ops

    c = shape[1]
    x = torch.randn(shape, device=device).to(dtype)
    weight, bias = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    training = op != "fwd_eval"
    if provider.startswith("launch_"):
        if op == "train_step":
            return None
        # under backend_for(provider): the provider's backend
        return lambda: ops.run_forward(x, weight, bias, rm, rv, training, 1e-5, None, None)
    fn = F.batch_norm if provider == "torch" else bnkernels.batch_norm
    if op != "train_step":
        return lambda: fn(x, rm, rv, weight, bias, training, 0.1, 1e-5)
    leaves = [t.detach().requires_grad_(True) for t in (x, weight, bias)]
    grad = torch.randn_like(x)

    def step():
        for t in leaves:  # as optimizer.zero_grad() leaves them: no accumulation
            t.grad = None
        leaf, w, b = leaves
        fn(leaf, rm, rv, w, b, True, 0.1, 1e-5).backward(grad)
    return step


def _host_times_us(fns: dict, calls: int, device: str) -> dict:
    """Each provider's (median, p20, p80) host time per call. The providers take turns, in
    ROUNDS rounds of calls // ROUNDS calls each (after a few untimed ones under that
    provider's backend), so that a slow phase of the machine falls on all of them alike."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    samples = {provider: [] for provider in fns}
    per_round = max(1, calls // ROUNDS)
    for round_ in range(ROUNDS):
        for provider, fn in fns.items():
            with common.backend_for(provider.replace("launch_", "bnkernels_")):
                # warm-up: JIT compiles, library loads, allocator caches, the replays
                for _ in range(20 if round_ == 0 else 3):
                    fn()
                sync()
                timed = samples[provider]
                for i in range(per_round):
                    start = time.perf_counter_ns()
                    fn()
                    timed.append((time.perf_counter_ns() - start) / 1e3)
                    if (i + 1) % SYNC_EVERY == 0:
                        sync()
                sync()
    out = {}
    for provider, timed in samples.items():
        q = statistics.quantiles(timed, n=10)
        out[provider] = (statistics.median(timed), q[1], q[7])
    return out


class _NoOpCompiled:
    """A compiled kernel whose launch (the driver call) does nothing."""

    def __getitem__(self, grid):
        return lambda *args: None


def _gpu_host_path_on_cpu() -> None:
    """--cpu: CPU tensors launch as CUDA ones would, up to the driver call (a no-op)."""
    from bnkernels.backends.triton import launch
    launch.cpu_launch = launch._bound_launch
    launch._first_launch = lambda kernel, grid, args, meta: _NoOpCompiled()


def run(args) -> list:
    device = "cpu" if args.smoke or args.cpu else "cuda"
    if device == "cpu":
        common.emulate_on_cpu()
    providers = PROVIDERS
    shapes = [(2, 8, 3, 3)] if args.smoke else SHAPES
    dtype = torch.float32 if args.smoke else torch.bfloat16
    gpu = common.device_name(device)
    if args.cpu:
        _gpu_host_path_on_cpu()
        providers, shapes, dtype = CPU_PROVIDERS, CPU_SHAPES, torch.float32
        gpu = f"{gpu} (host path; no-op GPU launch)"
        torch.set_num_threads(1)  # torch's tiny CPU kernels: no thread pool start-up
    meta = dict(gpu=gpu, torch=torch.__version__,
                triton=common.triton_version(), cuda=torch.version.cuda or "none",
                commit=common.commit())
    rows = []
    for op in OPS:
        for shape in shapes:
            fns = {}
            for provider in providers:
                with common.backend_for(provider.replace("launch_", "bnkernels_")):
                    fn = _call(op, provider, shape, dtype, device)
                if fn is not None:
                    fns[provider] = fn
            times = _host_times_us(fns, args.calls, device)
            for provider, (med, p20, p80) in times.items():
                rows.append(dict(op=op, dtype=str(dtype).replace("torch.", ""), N=shape[0],
                                 C=shape[1], H=shape[2], W=shape[3], provider=provider,
                                 host_us_median=med, host_us_p20=p20, host_us_p80=p80,
                                 calls=args.calls, **meta))
            print(f"{op} {shape}: " + ", ".join(f"{p} {t[0]:.1f}" for p, t in times.items())
                  + " us", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--smoke", action="store_true", help="tiny run on CPU: harness check")
    parser.add_argument("--cpu", action="store_true",
                        help="the GPU host path on this CPU, the driver call a no-op")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.calls = min(args.calls, 30)
    elif not args.cpu and not torch.cuda.is_available():
        print("bench_launch.py times launches on a CUDA GPU; there is none here (--smoke "
              "checks the harness).")
        return 2
    rows = run(args)
    path = common.append_rows(args.out, "cpu" if args.smoke or args.cpu else "cuda",
                              "launch.csv", COLUMNS, rows)
    print(f"{len(rows)} rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
