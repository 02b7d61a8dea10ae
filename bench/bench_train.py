"""End to end: a ResNet-50 training step with convert_batchnorm vs plain nn.BatchNorm2d.

    python bench/bench_train.py [--batch 128] [--steps 30] [--out DIR] [--variants a,b]

Variants: torch_batchnorm (the model as built), bnkernels (convert_batchnorm),
bnkernels_fused (convert_batchnorm(fuse=True): BN+ReLU and BN+add+ReLU fused), and the
"+compile" form of each (torch.compile of that model, default inductor).

torchvision's ResNet-50 (bench/resnet.py's where torchvision is missing), channels_last,
bfloat16 autocast, SGD; images/s over the timed steps after warm-up, and the peak memory.
Rows are appended to DIR/train.csv (DIR defaults to bench/results/<gpu>/), each as
soon as its variant is measured.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bnkernels  # noqa: E402
import common  # noqa: E402
from models import resnet50  # noqa: E402

VARIANTS = ["torch_batchnorm", "bnkernels", "bnkernels_fused", "torch_batchnorm+compile",
            "bnkernels_fused+compile"]
COLUMNS = ["model", "variant", "batch", "images_per_s", "step_ms", "peak_mem_gb", "device",
           "torch", "triton", "commit"]


def images_per_second(model, batch, steps, warmup, device):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = loss_fn(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return batch * steps / seconds, 1e3 * seconds / steps, peak


def _run_variant(variant, base, name, args, meta, emit):
    model = copy.deepcopy(base)
    kind = variant.removesuffix("+compile")
    if kind == "bnkernels":
        model = bnkernels.convert_batchnorm(model)
    elif kind == "bnkernels_fused":
        model = bnkernels.convert_batchnorm(model, fuse=True)
    elif kind != "torch_batchnorm":
        raise SystemExit(f"unknown variant {variant!r}")
    if variant.endswith("+compile"):
        model = torch.compile(model)
    ips, ms, peak = images_per_second(model, args.batch, args.steps, args.warmup, args.device)
    emit(dict(model=name, variant=variant, batch=args.batch, images_per_s=ips, step_ms=ms,
              peak_mem_gb=peak, **meta))
    print(f"{variant}: {ips:.1f} images/s, {ms:.1f} ms/step, peak {peak:.2f} GB", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    base, name = resnet50()
    base = base.to(args.device).to(memory_format=torch.channels_last)
    meta = dict(device=common.device_name(args.device), torch=torch.__version__,
                triton=common.triton_version(), commit=common.commit())
    path = common.results_path(args.out, args.device, "train.csv")
    with common.csv_rows(path, COLUMNS) as emit:  # each row as it is measured
        for variant in args.variants.split(","):
            _run_variant(variant, base, name, args, meta, emit)
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
