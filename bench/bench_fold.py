"""Inference latency of ResNet-50 folded (bnkernels.fold_conv_bn) vs unfolded.

    python bench/bench_fold.py [--device cuda|cpu] [--batches 1,32] [--dtypes float32,float16]
                               [--modes eager,compile] [--reps N] [--out DIR]

ResNet-50 is torchvision's where torchvision is installed, else bench/resnet.py's (the same
structure). The unfolded model uses torch's nn.BatchNorm2d. Each row: the median and
20th/80th percentiles of the forward latency (ms) under torch.no_grad(), after warm-up.
On a GPU: triton.testing.do_bench. On a CPU: wall-clock over --reps runs (labelled `cpu`).
Rows are appended to DIR/fold.csv (DIR defaults to bench/results/<device>/).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bnkernels  # noqa: E402
import common  # noqa: E402
from models import resnet50  # noqa: E402

COLUMNS = ["model", "variant", "mode", "dtype", "batch", "median_ms", "p20_ms", "p80_ms",
           "speedup", "max_abs_diff", "device", "torch", "triton", "commit"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}




def _randomize_bn(model):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model


def _time(fn, device, reps):
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(samples, n=10) if len(samples) > 1 else samples * 9
    return statistics.median(samples), q[1], q[7]


def _meta(device):
    return dict(device=common.device_name(device), torch=torch.__version__,
                triton=common.triton_version(), commit=common.commit())


def run(args, emit):
    device = args.device
    base, model_name = resnet50()
    base = _randomize_bn(base).eval()
    meta = _meta(device)
    # every eager row before any compiled one: the whole-model compiles take minutes, and
    # a run stopped part-way (the GPU suite's budget) keeps the rows written
    for mode in args.modes.split(","):
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            unfolded = copy.deepcopy(base).to(device, dtype)
            if device == "cuda":
                unfolded = unfolded.to(memory_format=torch.channels_last)
            models = {"unfolded": unfolded, "folded": bnkernels.fold_conv_bn(unfolded)}
            if mode == "compile":
                models = {k: torch.compile(m) for k, m in models.items()}
            for batch in (int(b) for b in args.batches.split(",")):
                if f"{dname}:{batch}" in args.skip.split(","):
                    continue
                x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
                if device == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    diff = (models["folded"](x).float() - models["unfolded"](x).float()).abs().max().item()
                    timings = {}
                    for variant, model in models.items():
                        timings[variant] = _time(lambda: model(x), device, args.reps)
                for variant, (med, p20, p80) in timings.items():
                    emit(dict(model=model_name, variant=variant, mode=mode, dtype=dname,
                              batch=batch, median_ms=med, p20_ms=p20, p80_ms=p80,
                              speedup=timings["unfolded"][0] / med, max_abs_diff=diff, **meta))
                print(f"{dname} {mode} batch {batch}: unfolded {timings['unfolded'][0]:.2f} ms, "
                      f"folded {timings['folded'][0]:.2f} ms "
                      f"({timings['unfolded'][0] / timings['folded'][0]:.2f}x), "
                      f"max |diff| {diff:.2e}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--skip", default="",
                        help="dtype:batch pairs to leave out, e.g. float16:32 (slow on a CPU)")
    parser.add_argument("--modes", default="eager,compile")
    parser.add_argument("--reps", type=int, default=10, help="CPU only: timed runs per row")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    path = common.results_path(args.out, args.device, "fold.csv")
    with common.csv_rows(path, COLUMNS) as emit:
        run(args, emit)
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
