"""One BatchNorm pass on one shape, for ncu (bench/gpu_suite.py's stage 5):

    python bench/ncu_target.py OP LAYOUT DTYPE C H W [--batch 128] [--smoke]

OP: fwd_train, bwd or fwd_eval; LAYOUT: nchw or nhwc. Runs the pass three times on the
default backend (the first compiles), so ncu sees warm launches. --smoke: N = 2 on CPU.
"""
from __future__ import annotations

import argparse
import sys

import torch

import bnkernels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("op", choices=["fwd_train", "bwd", "fwd_eval"])
    parser.add_argument("layout", choices=["nchw", "nhwc"])
    parser.add_argument("dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("c", type=int)
    parser.add_argument("h", type=int)
    parser.add_argument("w", type=int)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    n = 2 if args.smoke else args.batch
    fmt = torch.channels_last if args.layout == "nhwc" else torch.contiguous_format
    x = torch.randn(n, args.c, args.h, args.w, device=device).to(getattr(torch, args.dtype))
    x = x.contiguous(memory_format=fmt).requires_grad_(args.op == "bwd")
    rm, rv = torch.zeros(args.c, device=device), torch.ones(args.c, device=device)
    training = args.op != "fwd_eval"
    for _ in range(3):
        y = bnkernels.batch_norm(x, rm, rv, training=training)
        if args.op == "bwd":
            torch.autograd.grad(y, x, torch.ones_like(y))
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"ran {args.op} {args.layout} {args.dtype} {tuple(x.shape)} x3")
    return 0


if __name__ == "__main__":
    sys.exit(main())
