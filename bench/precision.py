"""The worst error of bnkernels' float32 batch statistics against float64, over shifted,
outlier and large-mean inputs, per backend, plan and layout; torch.var_mean on the same
float32 inputs beside it.

    python bench/precision.py [--device cpu] [--out DIR]

Errors: the mean's relative to the data's RMS sqrt(mean^2 + var) (a mean near 0 has no
relative precision of its own), the variance's relative to the variance; the worst channel
of the worst input. On CPU the kernels run through the Triton interpreter and csrc/'s
emulation build; `many_programs` shrinks the tiles and the grid's budget so that every
channel is split over many programs (the Welford merge across them), `long_programs` the
tiles alone, so that each program loops over many of them (the forward loop's groups). Rows go to
DIR/precision.csv. tests/test_numerics.py asserts the bound on the same inputs.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

COLUMNS = ["backend", "plan", "layout", "inputs", "worst_mean_err", "worst_var_err",
           "torch_var_mean_mean_err", "torch_var_mean_var_err", "worst_case", "device",
           "torch", "triton", "commit"]
# (N, S) per plan; many programs on a smaller input (the interpreter's cost is per program)
# long_programs: tiny tiles and few programs, so that each lane takes many tiles (the
# forward loop's groups of GROUP_TILES tiles, then its tail)
SIZES = {"default_plan": ((64, 32), (8, 4096)), "many_programs": ((16, 64),),
         "long_programs": ((16, 60), (7, 37))}


def stat_inputs(device, sizes):
    """{name: (N, 2, S) float32}: outliers of 1e6 at the positions a shift could take them
    from (a channel's first element, a split's, a lane's, the last), two outliers of
    opposite signs, a mean of 1e4, and a mean of -3e3 with std 1e-2."""
    gen = torch.Generator().manual_seed(11)
    cases = {}
    for n, s in sizes:
        for pos in ((0, 0), (n // 2, s // 3), (n - 1, s - 1), (0, 1), (1, 0), (0, s // 2)):
            x = torch.randn(n, 2, s, generator=gen)
            x[pos[0], :, pos[1]] += 1e6
            cases[f"outlier {n}x{s} at {pos}"] = x
        x = torch.randn(n, 2, s, generator=gen)
        x[0, 0, 0] += 1e6
        x[n - 1, 0, 0] -= 3e5
        cases[f"two outliers {n}x{s}"] = x
        cases[f"mean 1e4 {n}x{s}"] = torch.randn(n, 2, s, generator=gen) + 1e4
        cases[f"mean -3e3 std 1e-2 {n}x{s}"] = torch.randn(n, 2, s, generator=gen) * 1e-2 - 3e3
    return {k: v.to(device) for k, v in cases.items()}


def stat_errors(mean, var, x):
    """(mean error / RMS, var error / var), the worst channel's, against float64."""
    x64 = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    var64, mean64 = torch.var_mean(x64, dim=1, correction=0)
    rms = (mean64 ** 2 + var64).sqrt()
    return (((mean.double() - mean64).abs() / rms).max().item(),
            ((var.double() - var64).abs() / var64).max().item())


@contextlib.contextmanager
def many_programs(programs: int = 64):
    """Tiny tiles and grids of many programs, every channel split over many of them (also
    tests/test_numerics.py's many_splits); programs=2: tiny tiles and few programs, each
    lane taking many tiles (long_programs)."""
    from bnkernels.backends.cuda import plan as cuda_plan
    from bnkernels.backends.triton import plan as triton_plan
    names = {(triton_plan, "INTERPRETER_TILE"): 64, (triton_plan, "GPU_TILE"): 64,
             (triton_plan, "INTERPRETER_PROGRAMS"): programs,
             (cuda_plan, "EMULATED_BLOCKS"): programs,
             (cuda_plan, "CUDA_BLOCKS_PER_SM"): 1024, (cuda_plan, "CUDA_MIN_ROWS_PER_LANE"): 1}
    before = {k: getattr(*k) for k in names}
    for (module, name), v in names.items():
        setattr(module, name, v)
    try:
        yield
    finally:
        for (module, name), v in before.items():
            setattr(module, name, v)


def plan_context(plan: str):
    """The context that makes a SIZES plan."""
    if plan == "default_plan":
        return contextlib.nullcontext()
    return many_programs(64 if plan == "many_programs" else 2)


def measure(backend, plan, channels_last, device):
    worst = {"worst_mean_err": 0.0, "worst_var_err": 0.0, "torch_var_mean_mean_err": 0.0,
             "torch_var_mean_var_err": 0.0, "worst_case": ""}
    with common.backend_for(backend), plan_context(plan):
        for name, x in stat_inputs(device, SIZES[plan]).items():
            if channels_last:
                x = x.unsqueeze(-1).contiguous(memory_format=torch.channels_last)
            mean_err, var_err = stat_errors(*torch.ops.bnkernels.batch_norm_stats(x), x)
            var, mean = torch.var_mean(x.transpose(0, 1).reshape(x.shape[1], -1), dim=1,
                                       correction=0)
            torch_mean_err, torch_var_err = stat_errors(mean, var, x)
            if max(mean_err, var_err) > max(worst["worst_mean_err"], worst["worst_var_err"]):
                worst["worst_case"] = name
            worst["worst_mean_err"] = max(worst["worst_mean_err"], mean_err)
            worst["worst_var_err"] = max(worst["worst_var_err"], var_err)
            worst["torch_var_mean_mean_err"] = max(worst["torch_var_mean_mean_err"], torch_mean_err)
            worst["torch_var_mean_var_err"] = max(worst["torch_var_mean_var_err"], torch_var_err)
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", default="bnkernels_triton,bnkernels_cuda")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        common.emulate_on_cpu()
    import bnkernels  # noqa: F401  (after emulate_on_cpu: registers the ops)
    meta = dict(device=common.device_name(args.device), torch=torch.__version__,
                triton=common.triton_version(), commit=common.commit())
    rows = []
    for backend in args.backends.split(","):
        for plan in SIZES:
            for channels_last in (False, True):
                worst = measure(backend, plan, channels_last, args.device)
                layout = "channels_last" if channels_last else "contiguous"
                rows.append(dict(backend=backend, plan=plan, layout=layout,
                                 inputs=len(stat_inputs("cpu", SIZES[plan])), **worst, **meta))
                print(f"{backend} {plan} {layout}: mean {worst['worst_mean_err']:.2e} "
                      f"var {worst['worst_var_err']:.2e} ({worst['worst_case']}); torch.var_mean "
                      f"mean {worst['torch_var_mean_mean_err']:.2e} "
                      f"var {worst['torch_var_mean_var_err']:.2e}", flush=True)
    path = common.append_rows(args.out, args.device, "precision.csv", COLUMNS, rows)
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
