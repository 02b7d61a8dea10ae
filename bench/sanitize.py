"""A short forward + backward of every kernel variant, for compute-sanitizer:

    compute-sanitizer --tool memcheck  python bench/sanitize.py [triton,cuda]
    compute-sanitizer --tool racecheck python bench/sanitize.py [triton,cuda]
    python bench/sanitize.py triton,cuda --smoke    the first shape only (a CPU dry run)

On each backend named (default both): NCHW and channels_last, training and eval, float32
and bfloat16, odd sizes (masked tails), one block per channel and many (split rows), and
the fused relu(bn(x) + residual). Exits non-zero if an output is not finite.
"""
import os
import sys

import torch

import bnkernels

SHAPES = [(3, 5, 7, 9), (16, 64, 28, 28), (2, 2048, 7, 7)]


def _outputs(shape, fmt, dtype, training, device):
    c = shape[1]
    bn = bnkernels.BatchNorm2d(c).to(device).train(training)
    act = bnkernels.BatchNormAct2d(c, activation="relu").to(device).train(training)
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    r = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    x.requires_grad_(True), r.requires_grad_(True)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype != torch.float32)
    with autocast:
        y = bn(x)
        z = act(x, r)
    (y.float().sum() + (z.float() * 2).sum()).backward()
    return (y, z, x.grad, r.grad, bn.weight.grad, bn.bias.grad, bn.running_var, act.weight.grad)


def run(backend: str, device: str, shapes=SHAPES) -> int:
    os.environ["BNKERNELS_BACKEND"] = backend
    bad = 0
    for shape in shapes:
        for fmt in (torch.contiguous_format, torch.channels_last):
            for dtype in (torch.float32, torch.bfloat16):
                for training in (True, False):
                    outputs = _outputs(shape, fmt, dtype, training, device)
                    bad += sum(not torch.isfinite(t).all().item() for t in outputs)
    return bad


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    shapes = SHAPES[:1] if "--smoke" in argv else SHAPES
    argv = [a for a in argv if a != "--smoke"]
    backends = (argv[0] if argv else "triton,cuda").split(",")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bad = 0
    for backend in backends:
        found = run(backend, device, shapes)
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"sanitize run, {backend}:", f"{found} non-finite outputs" if found
              else "all outputs finite")
        bad += found
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
