"""python -m bnkernels.selfcheck: bnkernels against torch.nn.BatchNorm2d on this machine.

The main job's answer where there is no CUDA GPU: the real kernels of both backends run on
CPU tensors (Triton's through its interpreter, TRITON_INTERPRET=1; csrc/'s CUDA C++ through
its emulation build, BNKERNELS_CUDA_EMULATE=1, where the CUDA headers are installed) and
are compared with torch, forward and backward, training and eval, for a few layouts and
dtypes. Timings need a GPU.
"""
from __future__ import annotations

import os
import sys

import torch

CASES = [  # (N, C, H, W), dtype, layout
    ((8, 16, 14, 14), torch.float32, "nchw"),
    ((8, 16, 14, 14), torch.float32, "nhwc"),
    ((4, 32, 7, 7), torch.bfloat16, "nhwc"),
    ((4, 32, 7, 7), torch.float16, "nchw"),
]
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _max_errors(shape, dtype, layout, training, device):
    import bnkernels

    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(shape[1]).to(device)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5), ref.bias.uniform_(-1, 1)
        ref.running_mean.uniform_(-1, 1), ref.running_var.uniform_(0.5, 2)
    ours = bnkernels.convert_batchnorm(torch.nn.Sequential(
        torch.nn.BatchNorm2d(shape[1]).to(device)))[0]
    ours.load_state_dict(ref.state_dict())
    ref.train(training), ours.train(training)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x0 = (torch.randn(shape, device=device) * 2 + 3).to(dtype).contiguous(memory_format=fmt)
    g = torch.randn(shape, device=device).to(dtype)
    results = []
    for m in (ref, ours):
        x = x0.detach().requires_grad_(True)
        y = m(x)
        results.append([y] + list(torch.autograd.grad(y, (x, m.weight, m.bias), g))
                        + [m.running_mean, m.running_var])
    names = ("y", "dx", "dweight", "dbias", "running_mean", "running_var")
    return {n: ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1)).item()
            for n, a, b in zip(names, results[1], results[0])}


def _check(backend: str, device: str) -> int:
    """Failures of one backend over CASES, printed as a table."""
    os.environ["BNKERNELS_BACKEND"] = backend
    print(f"{'shape':<18}{'dtype':<10}{'layout':<7}{'mode':<7}{'worst relative error':<32}result")
    failed = 0
    for shape, dtype, layout in CASES:
        for training in (True, False):
            errors = _max_errors(shape, dtype, layout, training, device)
            worst = max(errors, key=errors.get)
            ok = errors[worst] <= TOL[dtype]
            failed += not ok
            print(f"{str(shape):<18}{str(dtype)[6:]:<10}{layout:<7}"
                  f"{'train' if training else 'eval':<7}{f'{errors[worst]:.2e} ({worst})':<32}"
                  f"{'PASS' if ok else 'FAIL'}")
    return failed


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # both backends' kernels on CPU tensors
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("BNKERNELS_CUDA_EMULATE", "1")
    from bnkernels import backends
    from bnkernels.backends.cuda import library as cuda_library

    print(f"bnkernels self-check on {device} (torch {torch.__version__}); "
          f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, "
          f"BNKERNELS_CUDA_EMULATE={os.environ.get('BNKERNELS_CUDA_EMULATE', '0')}")
    print("\nbackend triton (Triton kernels)")
    failed = _check("triton", device)
    print(f"Triton kernel launches: {backends.get('triton').launch_counts()}")
    print("\nbackend cuda (csrc/'s CUDA C++ kernels)")
    try:
        cuda_library.library(torch.device(device))
    except RuntimeError as error:  # no toolkit to build it: say so, don't fail
        print(f"skipped: {error}")
    else:
        failed += _check("cuda", device)
        print(f"CUDA C++ kernel launches: {backends.get('cuda').launch_counts()}")
    if device == "cpu":
        print("\nNo CUDA GPU here: correctness only. Timings against cuDNN need a GPU "
              "(make bench on a CUDA machine runs bench/bench_bn.py).")
    print("self-check", "FAILED" if failed else "passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
