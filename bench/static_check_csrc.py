"""Static check of csrc/ (the CUDA C++ backend): its kernels as nvcc compiles them for the
architecture, read from their SASS, with static_check.py's reader and model.

    python bench/static_check_csrc.py --arch 90 [--out DIR] [--quick]

No GPU needed. For each pass (fwd_train, fwd_eval, bwd, and the fused bnrelu_* /
bnaddrelu_*) on ResNet-50's twelve BN shapes at N = 32 and 128, bfloat16 / float16 /
float32, NCHW and channels_last (nhwc), the launches batch_norm.cu makes (reduce, merge,
apply: the large shapes always split), each the kernel instantiation it dispatches to,
with the block plan and vector width the launcher gives (backends/cuda: block_plan,
vector_width) on an H100 (132 SMs). Columns as static_check.py's, plus `vec` (elements per
vector) and `kernel_layout` (rows, channels or channel blocks: csrc/bnk_api.h); the hot
loop is each kernel's first loop that loads (the forward reduce's groups
of 4 vectors, the backward reduce's, the apply's; after them come the one-block path's
and the folds'). The merge's time is its chain at one instruction per clock: its loops once per
split a thread takes, and its end. Rows go to DIR/csrc_sm<arch>.csv and a summary to
DIR/summary_csrc_sm<arch>.md.
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import static_check  # noqa: E402
from bench_bn import QUICK_SHAPES, RESNET50_SHAPES  # noqa: E402
from static_check import (BANDWIDTH, CLOCK_HZ, DTYPES, INFLIGHT_KB, ISSUE_PER_SM, PASSES, SMS,  # noqa: E402
                          read_loops, resident_programs)

COLUMNS = ["kernel", "pass", "dtype", "layout", "N", "C", "H", "W", "vec", "kernel_layout",
           "access_bits",
           "idiv_per_elem", "rcp_per_elem", "regs", "spills", "instr_per_elem", "mbytes",
           "est_ratio", "inflight_kb"]
_T = {torch.bfloat16: "__nv_bfloat16", torch.float16: "__half", torch.float32: "float"}
_LAYOUTS = {0: "rows", 1: "channels", 2: "blocks"}  # csrc/bnk_api.h's BNK_*
# bnk_api.h's activation codes
_RELU, _IDENTITY = 1, 0
# Each pass: its launches as (kernel, ACT, RES, Y, element tensors moved), batch_norm.cu's
# run_forward / run_backward on a split call; relu after a residual saves y (Y) for its
# backward, the residual itself not.
_LAUNCHES = {
    "fwd_train": [("reduce_stats", None, None, None, 1), ("merge", None, None, None, 0),
                  ("apply_normalize", _IDENTITY, 0, None, 2)],
    "fwd_eval": [("apply_normalize", _IDENTITY, 0, None, 2)],
    "bwd": [("reduce_grads", _IDENTITY, 0, 0, 2), ("merge", None, None, None, 0),
            ("apply_input_grad", _IDENTITY, 0, 0, 3)],
    "bnrelu_fwd_train": [("reduce_stats", None, None, None, 1), ("merge", None, None, None, 0),
                         ("apply_normalize", _RELU, 0, None, 2)],
    "bnrelu_bwd": [("reduce_grads", _RELU, 0, 0, 2), ("merge", None, None, None, 0),
                   ("apply_input_grad", _RELU, 0, 0, 3)],
    "bnaddrelu_fwd_train": [("reduce_stats", None, None, None, 1),
                            ("merge", None, None, None, 0), ("apply_normalize", _RELU, 1, None, 3)],
    "bnaddrelu_bwd": [("reduce_grads", _RELU, 0, 1, 3), ("merge", None, None, None, 0),
                      ("apply_input_grad", _RELU, 0, 1, 5)],
}


# The translation unit that holds each dtype's kernels (csrc/ compiles one per element type).
_UNITS = {"bfloat16": "kernels_bf16.cu", "float16": "kernels_f16.cu",
          "float32": "kernels_f32.cu"}


def compile_kernels(arch: int, dtypes) -> dict:
    """{demangled kernel name: its read (static_check._read, plus regs, spills, shared)}
    of csrc/'s kernels for `dtypes` compiled by nvcc for sm_<arch>. Only their units are
    compiled: each takes half a minute, and --quick reads one dtype."""
    from bnkernels.backends.cuda import build as cuda_build
    nvcc = cuda_build.find_nvcc()
    if nvcc is None:
        raise SystemExit("static_check_csrc.py needs nvcc")
    flags = [f for f in cuda_build.NVCC_FLAGS if f not in ("-Xcompiler", "-fPIC")]
    tool = static_check._cuobjdump()
    wanted = {_UNITS[d] for d in dtypes}
    units = [u for u in cuda_build.translation_units() if u.name in wanted]

    def read(unit):  # (its SASS, its resource usage)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "unit.cubin"
            subprocess.run([nvcc, "-cubin", *flags, f"-arch=sm_{arch}", "-o", str(cubin),
                            str(unit)], check=True)
            return tuple(subprocess.run([tool, option, str(cubin)], capture_output=True,
                                        text=True, check=True).stdout
                         for option in ("-sass", "-res-usage"))

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        outputs = list(pool.map(read, units))
    sass = "\n".join(o[0] for o in outputs)
    usage = "\n".join(o[1] for o in outputs)
    resources = {}
    for name, body in re.findall(r"Function (\w+):\s*\n(.*?)(?=\n\s*Function |\Z)", usage,
                                 re.S):
        res = dict(re.findall(r"(REG|LOCAL|SHARED):(\d+)", body))
        resources[name] = (int(res.get("REG", 0)), int(res.get("LOCAL", 0)),
                           int(res.get("SHARED", 0)))
    reads = {}
    for part in re.split(r"\n\s+Function : ", sass)[1:]:
        name = part.split("\n", 1)[0].strip()
        regs, spills, shared = resources[name]
        reads[_demangle(name)] = {"regs": regs, "spills": spills, "shared": shared,
                                  **read_loops(part)}
    return reads


def _demangle(name: str) -> str:
    return subprocess.run(["c++filt", name], capture_output=True, text=True,
                          check=True).stdout.strip()


def _instantiation(kernel: str, dtype, vec: int, layout: int, act, res, y) -> str:
    t = _T[dtype]
    b = lambda v: "true" if v else "false"  # noqa: E731
    if kernel == "merge":
        return f"void merge_kernel<{t}>(BnkCall, int)"
    args = [t, str(vec), str(layout)]
    if kernel in ("apply_normalize", "reduce_grads", "apply_input_grad"):
        args += [str(act), b(res)]
    if kernel in ("reduce_grads", "apply_input_grad"):
        args.append(b(y))
    return f"void {kernel}_kernel<{', '.join(args)}>(BnkCall)"


def _plan(n, c, s, dtype, fast):
    """The block plan the launcher gives dense tensors of this shape (launch.Launch.plan:
    its vector width and layout)."""
    from bnkernels.backends.cuda import launch as cuda_launch
    from bnkernels.backends.cuda import plan as cuda_plan
    shape = (n, c, s)
    x = torch.empty(shape, dtype=dtype)
    if fast:
        x = x.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    cuda_plan.sm_count = lambda index: SMS
    gpu = torch.device("cuda", 0)
    vec = cuda_launch.vector_width([x], n, c, s, fast)
    if vec == 1 and not fast and cuda_launch.channel_blocks_fit([x], n, c, s):
        plan = cuda_plan.channel_block_plan(n, c, s, gpu, 16 // x.element_size())
        if plan is not None:
            return plan
    return cuda_plan.block_plan(n, c, s, fast, gpu, vec)


def _row(kernel, read, plan, numel, esize, tensors, c) -> dict:
    threads, vec = plan.threads, plan.vec
    grid = -(-c // plan.block_c) * plan.splits
    if kernel == "merge":
        lanes = 1
        while lanes < plan.splits and lanes < threads:
            lanes *= 2
        grid = -(-c // (threads // lanes))
        nbytes = (4 * plan.splits * c + 3 * c) * 4
        chain = -(-plan.splits // lanes) * read["loop_instructions"] + read["outside"]
        t_work, hot, per_iteration, load_bytes = chain / CLOCK_HZ, read, 1.0, 0
    else:
        # (the first loop that loads: the set-up's short loops, RowWalk's corrections, load
        # nothing)
        hot = next(loop for loop in read["loops"] if loop["load_bytes"])
        # elements a thread takes per iteration of its hot loop: 4 vectors (the forward
        # reduce's groups, of 4 samples in channel blocks; the others' APPLY_UNROLL
        # where the vectors are 128 bits wide)
        per_iteration = 4 * vec if kernel == "reduce_stats" or vec > 1 else 1
        nbytes = tensors * numel * esize
        warp_instructions = (numel / per_iteration / 32 * hot["loop_instructions"]
                             + grid * threads / 32 * read["outside"])
        t_work = warp_instructions / (ISSUE_PER_SM * SMS * CLOCK_HZ)
        load_bytes = hot["load_bytes"]
    t_floor = nbytes / BANDWIDTH
    resident = resident_programs(read["regs"], threads, read["shared"], grid)
    return {"kernel": kernel, "vec": vec, "kernel_layout": _LAYOUTS[plan.layout],
            "access_bits": hot["access_bits"],
            "idiv_per_elem": hot["idiv"] / per_iteration, "rcp_per_elem": hot["rcp"] / per_iteration,
            "regs": read["regs"], "spills": read["spills"],
            "instr_per_elem": hot["loop_instructions"] / per_iteration,
            "mbytes": nbytes / 1e6, "_time": max(t_floor, t_work), "_floor": t_floor,
            "est_ratio": max(t_floor, t_work) / t_floor,
            "inflight_kb": resident * threads * load_bytes / 1024}


def _total(rows) -> dict:
    time, floor = sum(r["_time"] for r in rows), sum(r["_floor"] for r in rows)
    streaming = [r for r in rows if r["kernel"] != "merge"]
    return {"kernel": "all", "vec": rows[0]["vec"], "kernel_layout": rows[0]["kernel_layout"],
            "access_bits": min(r["access_bits"] for r in streaming),
            "idiv_per_elem": sum(r["idiv_per_elem"] for r in streaming),
            "rcp_per_elem": sum(r["rcp_per_elem"] for r in streaming),
            "regs": max(r["regs"] for r in rows), "spills": max(r["spills"] for r in rows),
            "instr_per_elem": sum(r["instr_per_elem"] for r in streaming),
            "mbytes": sum(r["mbytes"] for r in rows), "est_ratio": time / floor,
            "inflight_kb": min(r["inflight_kb"] for r in streaming)}


def run(arch: int, quick: bool) -> list:
    shapes, batches = (QUICK_SHAPES, [32]) if quick else (RESNET50_SHAPES, [32, 128])
    dtypes = ["bfloat16"] if quick else ["bfloat16", "float16", "float32"]
    reads = compile_kernels(arch, dtypes)
    table = []
    for n in batches:
        for c, h, w in shapes:
            for dname in dtypes:
                dtype = DTYPES[dname]
                for layout in ("nchw", "nhwc"):
                    fast = layout == "nhwc"
                    plan = _plan(n, c, h * w, dtype, fast)
                    for name in PASSES:
                        rows = []
                        for kernel, act, res, y, tensors in _LAUNCHES[name]:
                            inst = _instantiation(kernel, dtype, plan.vec, plan.layout, act, res,
                                                  y)
                            rows.append(_row(kernel, reads[inst], plan, n * c * h * w,
                                             dtype.itemsize, tensors, c))
                        for row in rows + [_total(rows)]:
                            table.append({**{k: v for k, v in row.items()
                                             if not k.startswith("_")},
                                          "pass": name, "dtype": dname, "layout": layout,
                                          "N": n, "C": c, "H": h, "W": w})
    return table


def summary(table: list, arch: int) -> str:
    import common
    totals = [r for r in table if r["kernel"] == "all"]
    launches = [r for r in table if r["kernel"] != "all"]
    streaming = [r for r in launches if r["kernel"] != "merge"]
    large = [r for r in totals if static_check._tensor_mb(r) >= 16]
    lines = [f"# Static check of csrc/, sm_{arch}: {len(totals)} passes, {len(launches)} "
             f"launches", "",
             f"Compiled offline (no GPU) by nvcc ({_nvcc_version()}), torch {torch.__version__}, "
             f"commit {common.commit()}; static_check.py's model: {SMS} SMs, "
             f"{CLOCK_HZ / 1e9} GHz, {BANDWIDTH / 1e12} TB/s (bench/static_check_csrc.py).",
             "",
             f"- passes that take 128-bit vectors: {sum(r['vec'] > 1 for r in totals)} of "
             f"{len(totals)}",
             f"- launches with a global access narrower than 128 bits in the hot loop: "
             f"{sum(r['access_bits'] < 128 for r in streaming)}",
             f"- launches with an integer division in the hot loop: "
             f"{sum(r['idiv_per_elem'] > 0 for r in streaming)}",
             f"- launches that spill: {sum(r['spills'] > 0 for r in launches)}",
             f"- reduce and apply launches with less than {INFLIGHT_KB} KB in flight per SM: "
             f"{sum(r['inflight_kb'] < INFLIGHT_KB for r in streaming)}",
             f"- passes over a tensor of 16 MB or more: {len(large)}; estimated above 1.5x the "
             f"floor: {sum(r['est_ratio'] > 1.5 for r in large)}, above 1.15x: "
             f"{sum(r['est_ratio'] > 1.15 for r in large)}", "",
             "Worst ten passes over a tensor of 16 MB or more by est_ratio:", ""]
    return "\n".join(lines + static_check.worst_passes(large)) + "\n"


def _nvcc_version() -> str:
    from bnkernels.backends.cuda import build as cuda_build
    out = subprocess.run([cuda_build.find_nvcc(), "--version"], capture_output=True,
                         text=True).stdout
    found = re.search(r"release ([\d.]+)", out)
    return f"CUDA {found.group(1)}" if found else "unknown"


def main(argv=None) -> int:
    args = static_check.parser_of(__doc__).parse_args(argv)
    table = run(args.arch, args.quick)
    static_check.write(args.out, f"csrc_sm{args.arch}", COLUMNS, table, summary(table, args.arch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
