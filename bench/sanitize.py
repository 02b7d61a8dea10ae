"""A short forward + backward of every kernel variant, for compute-sanitizer:

    compute-sanitizer --tool memcheck  python bench/sanitize.py
    compute-sanitizer --tool racecheck python bench/sanitize.py

NCHW and channels_last, training and eval, float32 and bfloat16, odd sizes (masked tails),
many programs per channel. Exits non-zero if an output is not finite.
"""
import sys

import torch

import bnkernels


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bad = 0
    for shape in [(3, 5, 7, 9), (16, 64, 28, 28), (2, 2048, 7, 7)]:
        for fmt in (torch.contiguous_format, torch.channels_last):
            for dtype in (torch.float32, torch.bfloat16):
                for training in (True, False):
                    bn = bnkernels.BatchNorm2d(shape[1]).to(device).train(training)
                    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
                    x.requires_grad_(True)
                    with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype != torch.float32):
                        y = bn(x)
                    y.backward(torch.randn_like(y))
                    for t in (y, x.grad, bn.weight.grad, bn.bias.grad, bn.running_var):
                        bad += not torch.isfinite(t).all().item()
    if device == "cuda":
        torch.cuda.synchronize()
    print("sanitize run:", "non-finite outputs" if bad else "all outputs finite")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
