"""Static check: the Triton kernels as a GPU launch compiles them, read from their SASS.

    python bench/static_check.py --arch 90 [--out DIR] [--quick] [--jobs 2]

No GPU needed. Each pass (fwd_train, fwd_eval, bwd, and the fused bnrelu_* / bnaddrelu_*)
is called through bnkernels on CPU tensors of ResNet-50's twelve BN shapes at N = 32 and
128, bfloat16 / float16 / float32, NCHW and channels_last (nhwc), with the Triton backend's GPU
plan (GPU_TILE, 4 programs per SM of an H100: 132 SMs); its launches are recorded, not run.
Each distinct launch is then specialised by Triton's own binder, exactly as JITFunction.run
would specialise it on a GPU (pointer alignment, integers divisible by 16, integers equal
to 1), and compiled for the architecture. From the cubin (cuobjdump -sass, -res-usage):

  access_bits     the narrowest global load or store in the kernel's loops (128: LDG.E.128)
  idiv_per_elem   integer divisions (I2F.U32.RP ... MUFU.RCP sequences) per element, in loops
  rcp_per_elem    other reciprocals (MUFU.RCP) per element, in loops
  regs, spills    registers per thread, local-memory bytes
  instr_per_elem  SASS instructions in the loops per element a thread handles per iteration
  mbytes          MB the launch moves (its element tensors, or the merge's partials)
  est_ratio       estimated time / floor, the floor being the bytes at 3.0 TB/s. The time is
                  the larger of: the bytes at 3.0 TB/s; the issue time, at 4
                  warp-instructions per clock per SM, 132 SMs, 1.755 GHz, of the loops'
                  instructions over every tile element (padding included) plus every
                  program's warps' instructions outside the loops (set-up, and the end
                  that pools its partials; slow paths that rarely run are counted too, so
                  this errs high); for the merge, its serial chain at one instruction per
                  clock: the loop over the splits (steps of BLOCK_S) and its end.
  inflight_kb     KB of global loads in flight per SM: the programs an SM holds at once
                  (registers, threads, shared memory, and the grid's share of the SMs),
                  times one iteration's loads of the hot loop, times STAGES - 1 where the
                  loop is pipelined (cp.async, LDGSTS). The bar: 32 KB (INFLIGHT_KB).
A row with kernel "all" sums a pass's launches (its est_ratio: the summed time over the
pass's floor; its inflight_kb: the least of its reduce and apply launches). The model
ignores latency beyond the bytes in flight, so an est_ratio near 1 is necessary, not
sufficient: the GPU suite measures it (bn.md shows the two side by side).

Rows are written to DIR/sm<arch>.csv (default bench/results/static/); --quick: three shapes
at N = 32, one dtype, for the tests.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bn import QUICK_SHAPES, RESNET50_SHAPES  # noqa: E402

COLUMNS = ["kernel", "pass", "dtype", "layout", "N", "C", "H", "W", "access_bits",
           "idiv_per_elem", "rcp_per_elem", "regs", "spills", "instr_per_elem", "mbytes",
           "est_ratio", "inflight_kb"]
PASSES = ["fwd_train", "fwd_eval", "bwd", "bnrelu_fwd_train", "bnrelu_bwd",
          "bnaddrelu_fwd_train", "bnaddrelu_bwd"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
LAYOUTS = ["nchw", "nhwc"]  # bench_bn.py's names: the GPU suite joins the two
# The H100 the estimate models (SXM: DEVELOPERS.md's measured copy bandwidth).
SMS, CLOCK_HZ, BANDWIDTH, ISSUE_PER_SM = 132, 1.755e9, 3.0e12, 4
# Its SM's limits on resident programs (the occupancy calculator's): registers (allocated
# per warp in units of 256), threads, shared memory (1 KB reserved per block), blocks.
REGS_PER_SM, THREADS_PER_SM, SHARED_PER_SM, BLOCKS_PER_SM = 65536, 2048, 228 * 1024, 32
# Bytes in flight per SM that hide the memory latency at full bandwidth (Little's law:
# ~3 TB/s x ~1.4 us over 132 SMs): the issue's bar for a loop that is not pipelined.
INFLIGHT_KB = 32


# ------------------------------------------------------------------ recording launches

class Launched(NamedTuple):
    """One recorded launch, as the table needs it (its tensors are not kept)."""
    kernel: str
    grid: tuple
    meta: dict
    key: tuple  # its compiled variant's (variants[key])
    tensors: int  # the element tensors it reads and writes
    partials: Tuple[int, int, int]  # merge: (numel, splits, element size) of its partials
    rows_per_split: int  # reduce and apply: the rows of each split but the last


def _record(passes, shapes, batches, dtypes, layouts, backend, variants: dict) -> list:
    """[(pass, dtype, layout, N, C, H, W, [Launched])] for every call; variants gets each
    launch's compiled variant, by key."""
    from bnkernels import backends
    from bnkernels.backends.triton import launch as triton_launch
    from bnkernels.backends.triton import plan as triton_plan
    import bnkernels

    triton_plan.INTERPRETER_TILE = triton_plan.GPU_TILE  # the GPU's plan for CPU tensors
    triton_plan.INTERPRETER_PROGRAMS = triton_plan.PROGRAMS_PER_SM * SMS  # its GPU grid
    triton_launch._REPLAYS.clear()
    launched: list = []

    def record(kernel, grid, args, meta):
        key, variant = _specialised(kernel, args, meta, backend)
        variants.setdefault(key, variant)
        name = kernel.fn.__name__
        # the element tensors: its role pointers (a role the call lacks points at x); a
        # forward reduce reads x alone
        roles = 6 if name == "_apply_kernel" else 4 if meta.get("BACKWARD") else 1
        part = args[0]
        launched.append(Launched(name, tuple(grid), dict(meta), key,
                                 len({id(t) for t in args[:roles]}),
                                 (part.numel(), part.shape[1] if part.dim() == 3 else 1,
                                  part.element_size()),
                                 args[kernel.arg_names.index("rows_per_split")]))

    triton_launch.cpu_launch = record
    triton_backend = backends.get("triton")
    backends.select = lambda x: triton_backend  # CPU tensors, no interpreter: launches only
    calls = []
    for n in batches:
        for c, h, w in shapes:
            for dtype_name in dtypes:
                for layout in layouts:
                    for name in passes:
                        launched.clear()
                        _call(bnkernels, name, (n, c, h, w), DTYPES[dtype_name], layout,
                              launched)
                        calls.append((name, dtype_name, layout, n, c, h, w, list(launched)))
    return calls


def _call(bnkernels, name, shape, dtype, layout, launched: list) -> None:
    """The pass on uninitialised tensors (the kernels don't run: values don't matter);
    launched holds the pass's launches after it (a backward's: not its forward's)."""
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    c = shape[1]
    x = torch.empty(shape, dtype=dtype, memory_format=fmt)
    w, b = torch.ones(c), torch.zeros(c)
    rm, rv = torch.zeros(c), torch.ones(c)
    act = "relu" if name.startswith(("bnrelu", "bnaddrelu")) else None
    res = torch.empty_like(x) if name.startswith("bnaddrelu") else None
    training = not name.endswith("fwd_eval")
    backward = name.endswith("bwd")
    for t in (x, w, b, res) if backward else ():
        if t is not None:
            t.requires_grad_(True)
    with torch.set_grad_enabled(backward):
        y = bnkernels.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, activation=act,
                                 residual=res)
    if backward:
        launched.clear()
        y.backward(torch.empty_like(y))


# ------------------------------------------------------------------ specialising, compiling

def binder_available() -> bool:
    """Whether this triton has the binder _specialised drives (triton 3.9's JITFunction
    internals: create_function_from_signature, JITFunction._pack_args)."""
    try:
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError:
        return False
    return hasattr(JITFunction, "_pack_args")


def _specialised(kernel, args, meta, backend):
    """What JITFunction.run would compile for these arguments: (key, ASTSource parts)."""
    from triton.runtime.jit import create_function_from_signature
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(meta), bound,
                                                              specialization, options)
    key = (kernel.fn.__name__, repr(specialization), repr(sorted(options.__dict__.items())))
    return key, (kernel.fn.__name__, signature, constexprs, attrs, options.__dict__)


def _compile(arch: int, variant, read_more=None) -> dict:
    """A variant's cubin, read: registers, spills, and the loops' instruction counts; and
    read_more(ptx, sass)'s dict where given (a module-level function: this runs in a
    worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from bnkernels.backends.triton import kernels, persistent
    name, signature, constexprs, attrs, options = variant
    fn = getattr(kernels, name, None) or getattr(persistent, name)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                       attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    cubin = compiled.asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
        usage = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    res = dict(re.findall(r"(REG|LOCAL):(\d+)", usage))
    more = read_more(compiled.asm["ptx"], sass) if read_more else {}
    return {"regs": int(res["REG"]), "spills": int(res.get("LOCAL", 0)),
            "shared": compiled.metadata.shared, **read_loops(sass), **more}


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia
    bundled = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_WIDTHS = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def read_loops(sass: str) -> dict:
    """The instructions inside loops (a backward branch's range) of a kernel's SASS:
    their count, the narrowest global access, integer divisions and reciprocals; and the
    same per loop ("loops": the disjoint loop regions in address order; the forward
    reduce has two, its groups of GROUP_TILES tiles and its tail)."""
    code = [(int(a, 16), op, rest) for a, _, op, rest in _INSTRUCTION.findall(sass)]
    ranges = []
    for address, op, rest in code:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        # (a branch to itself is the idle loop after EXIT, not a loop of the kernel's)
        if target and int(target.group(1), 16) < address:
            ranges.append([int(target.group(1), 16), address])
    regions: list = []  # overlapping ranges joined: one region per (outermost) loop
    for start, end in sorted(ranges):
        if regions and start <= regions[-1][1]:
            regions[-1][1] = max(regions[-1][1], end)
        else:
            regions.append([start, end])
    loops = [_read_ops([op for a, op, _ in code if start <= a <= end])
             for start, end in regions]
    total = _read_ops([op for a, op, _ in code if any(s <= a <= e for s, e in regions)])
    # once per program: the set-up and the end (the lanes' merge, the stores), padding
    # and the idle branch after EXIT apart; slow paths that rarely run (a division's
    # subroutine) are counted too, so this errs high
    outside = sum(op != "NOP" and not (op.startswith("BRA") and f"0x{a:x}" in rest)
                  and not any(s <= a <= e for s, e in regions) for a, op, rest in code)
    return {**total, "outside": outside, "loops": loops}


def _read_ops(ops: list) -> dict:
    """A region's instructions: their count, the narrowest global access, integer
    divisions, other reciprocals, the bytes its global loads take per thread (LDG, and
    the cp.async copies LDGSTS of a pipelined loop), and how many of those are LDGSTS."""
    access = [(op.split(".")[0], _width(op)) for op in ops
              if op.split(".")[0] in ("LDG", "STG", "LDGSTS")]  # (not LDGDEPBAR)
    idiv = sum(op.startswith("I2F") and ".RP" in op for op in ops)
    rcp = sum(op.startswith("MUFU.RCP") for op in ops)
    return {"loop_instructions": len(ops),
            "access_bits": min(w for _, w in access) if access else 0,
            "idiv": idiv, "rcp": max(0, rcp - idiv),
            "load_bytes": sum(w // 8 for kind, w in access if kind != "STG"),
            "async_loads": sum(kind == "LDGSTS" for kind, _ in access)}


def _width(op: str) -> int:
    for part in op.split(".")[1:]:
        if part in _WIDTHS:
            return _WIDTHS[part]
    return 32


# ------------------------------------------------------------------ the table

def _row_of_launch(launch: Launched, read: dict, numel: int, rows: int, c: int,
                   esize: int) -> dict:
    from bnkernels.backends.triton.plan import GROUP_TILES
    meta = launch.meta
    threads = 32 * meta.get("num_warps", 4)
    block_c, block_r = meta["BLOCK_C"], meta.get("BLOCK_R", meta.get("BLOCK_S", 1))
    # a tile's elements, and the loop's step over the rows: channel blocks' tiles are
    # block_r lanes of one sample (CHANNEL_SPAN = block_c * S), their loop over samples
    span = meta.get("CHANNEL_SPAN", 0)
    tile = block_r if span else block_c * block_r
    step, loop_rows = (1, rows * block_c // span) if span else (block_r, rows)
    per_thread = max(1.0, tile / threads)  # elements per thread per iteration
    loop = read["loop_instructions"]
    grouped = (launch.kernel == "_reduce_kernel" and not meta.get("BACKWARD")
               and len(read["loops"]) == 2)
    hot = read["loops"][0] if grouped else read
    # per element: the hot loop's, over the elements a thread takes in one of its
    # iterations (a group loop takes GROUP_TILES tiles)
    per_iteration = per_thread * (GROUP_TILES if grouped else 1)
    if launch.kernel == "_merge_kernel":
        part_numel, splits, part_size = launch.partials
        nbytes = (part_numel + 3 * c) * part_size
        steps = -(-splits // meta.get("BLOCK_S", 1))  # its serial loop over the splits
        # at one instruction per clock, its set-up and end included
        t_work = (steps * loop + read["outside"]) / CLOCK_HZ
    else:
        nbytes = launch.tensors * numel * esize
        if grouped:  # a channel block's loop instructions: groups, then tail tiles, by split
            group_rows = GROUP_TILES * step
            group_loop, tail_loop = (r["loop_instructions"] for r in read["loops"])
            instructions = 0
            for j in range(launch.grid[1]):
                rows_j = max(0, min(launch.rows_per_split,
                                    loop_rows - j * launch.rows_per_split))
                groups = rows_j // group_rows
                instructions += groups * group_loop + -(-(rows_j - groups * group_rows)
                                                        // step) * tail_loop
        else:
            instructions = -(-loop_rows // step) * loop
        # each iteration's instructions, on every thread that holds a tile's elements;
        # and every program's warps' set-up and end (the lanes' merge, the stores)
        warp_instructions = (launch.grid[0] * instructions * (tile / per_thread) / 32
                             + launch.grid[0] * launch.grid[1] * threads / 32 * read["outside"])
        t_work = warp_instructions / (ISSUE_PER_SM * SMS * CLOCK_HZ)
    t_floor = nbytes / BANDWIDTH
    programs = 1
    for g in launch.grid:
        programs *= g
    resident = resident_programs(read["regs"], threads, read["shared"], programs)
    # a pipelined loop (cp.async, LDGSTS) keeps STAGES - 1 iterations' loads in flight
    ahead = max(1, meta.get("STAGES", 1) - 1) if hot["async_loads"] else 1
    inflight = resident * threads * hot["load_bytes"] * ahead / 1024
    return {"kernel": launch.kernel, "access_bits": read["access_bits"],
            "idiv_per_elem": hot["idiv"] / per_iteration,
            "rcp_per_elem": hot["rcp"] / per_iteration,
            "regs": read["regs"], "spills": read["spills"],
            "instr_per_elem": hot["loop_instructions"] / per_iteration,
            "mbytes": nbytes / 1e6, "_time": max(t_floor, t_work), "_floor": t_floor,
            "est_ratio": max(t_floor, t_work) / t_floor, "inflight_kb": inflight,
            "_pipelined": hot["async_loads"] > 0}


def resident_programs(regs: int, threads: int, shared: int, programs: int) -> int:
    """Programs of a launch resident on one SM at once: the occupancy limits (registers,
    threads, shared memory, blocks), and no more than the grid gives each SM."""
    warps = threads // 32
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = REGS_PER_SM // regs_per_warp // warps
    by_shared = SHARED_PER_SM // (shared + 1024)
    return max(1, min(by_regs, THREADS_PER_SM // threads, by_shared, BLOCKS_PER_SM,
                      -(-programs // SMS)))


def _pass_total(rows: list) -> dict:
    time, floor = sum(r["_time"] for r in rows), sum(r["_floor"] for r in rows)
    return {"kernel": "all", "access_bits": min(r["access_bits"] for r in rows),
            "idiv_per_elem": sum(r["idiv_per_elem"] for r in rows),
            "rcp_per_elem": sum(r["rcp_per_elem"] for r in rows),
            "regs": max(r["regs"] for r in rows), "spills": max(r["spills"] for r in rows),
            "instr_per_elem": sum(r["instr_per_elem"] for r in rows),
            "mbytes": sum(r["mbytes"] for r in rows), "est_ratio": time / floor,
            "inflight_kb": min(r["inflight_kb"] for r in rows if r["kernel"] != "_merge_kernel")}


def record_passes(quick: bool, backend, variants: dict) -> list:
    """_record of this check's set: every pass on ResNet-50's shapes at N = 32 and 128,
    three dtypes (quick: three shapes, N = 32, bfloat16)."""
    if quick:
        return _record(PASSES, QUICK_SHAPES, [32], ["bfloat16"], LAYOUTS, backend, variants)
    return _record(PASSES, RESNET50_SHAPES, [32, 128], list(DTYPES), LAYOUTS, backend,
                   variants)


def run(arch: int, quick: bool, jobs: int) -> list:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    backend = make_backend(GPUTarget("cuda", arch, 32))
    variants: dict = {}
    calls = record_passes(quick, backend, variants)
    print(f"{len(calls)} calls, {sum(len(call[-1]) for call in calls)} launches, "
          f"{len(variants)} distinct variants to compile for sm_{arch}", flush=True)
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {key: pool.submit(_compile, arch, v) for key, v in variants.items()}
        reads = {key: f.result() for key, f in futures.items()}
    table = []
    for name, dtype, layout, n, c, h, w, launches in calls:
        esize = DTYPES[dtype].itemsize
        rows_of_pass = [_row_of_launch(launch, reads[launch.key], n * c * h * w, n * h * w, c,
                                       esize) for launch in launches]
        for row in rows_of_pass + [_pass_total(rows_of_pass)]:
            table.append({**{k: v for k, v in row.items() if not k.startswith("_")},
                          "_pipelined": row.get("_pipelined", False),
                          "pass": name, "dtype": dtype, "layout": layout, "N": n, "C": c,
                          "H": h, "W": w})
    return table


def _in_loops(launches: list, column: str, what: str, which: str = "") -> str:
    """The summary's line for a per-element count: the launches with any in a loop, and
    the most per element (1: one per element; 1/32: one per thread per 32 elements)."""
    worst = max((r[column] for r in launches), default=0.0)
    return (f"- launches{which} with {what} in a loop: "
            f"{sum(r[column] > 0 for r in launches)}, at most {worst:.3g} per element")


def summary(table: list, arch: int) -> str:
    totals = [r for r in table if r["kernel"] == "all"]
    launches = [r for r in table if r["kernel"] != "all"]
    big = [r for r in totals if r["mbytes"] >= 16]
    large = [r for r in totals if _tensor_mb(r) >= 16]
    streaming = [r for r in launches if r["kernel"] in ("_reduce_kernel", "_apply_kernel")]
    import common
    lines = [f"# Static check, sm_{arch}: {len(totals)} passes, {len(launches)} launches", "",
             f"Compiled offline (no GPU) by triton {common.triton_version()}, torch "
             f"{torch.__version__}, commit {common.commit()}; the model's constants: {SMS} "
             f"SMs, {CLOCK_HZ / 1e9} GHz, {BANDWIDTH / 1e12} TB/s (bench/static_check.py).", "",
             f"- launches with a global access narrower than 128 bits in a loop: "
             f"{sum(r['access_bits'] < 128 for r in launches)}",
             _in_loops(launches, "idiv_per_elem", "an integer division"),
             _in_loops([r for r in launches if r["kernel"] != "_merge_kernel"],
                       "rcp_per_elem", "a reciprocal", " (the merge's float64 ones apart)"),
             f"- launches that spill: {sum(r['spills'] > 0 for r in launches)}",
             f"- reduce and apply launches with less than {INFLIGHT_KB} KB in flight per SM: "
             f"{sum(r['inflight_kb'] < INFLIGHT_KB for r in streaming)}; with a pipelined "
             f"hot loop: {sum(r['_pipelined'] for r in streaming)} of {len(streaming)}",
             f"- passes over a tensor of 16 MB or more: {len(large)}; estimated above 1.15x "
             f"the floor: {sum(r['est_ratio'] > 1.15 for r in large)}",
             f"- passes moving 16 MB or more (the tensor's reads and writes): {len(big)}; "
             f"estimated above 1.15x the floor: {sum(r['est_ratio'] > 1.15 for r in big)}",
             "", "Worst ten passes moving 16 MB or more by est_ratio:", ""]
    return "\n".join(lines + worst_passes(big)) + "\n"


def worst_passes(totals: list) -> list:
    """The summary's table: the ten passes of totals with the highest est_ratio."""
    lines = ["| pass | dtype | layout | N | C | H | tensor MB | est_ratio |", "| --- " * 8 + "|"]
    for r in sorted(totals, key=lambda r: -r["est_ratio"])[:10]:
        lines.append(f"| {r['pass']} | {r['dtype']} | {r['layout']} | {r['N']} | {r['C']} | "
                     f"{r['H']} | {_tensor_mb(r):.1f} | {r['est_ratio']:.2f} |")
    return lines


def _tensor_mb(row: dict) -> float:
    """The MB of the pass's input tensor."""
    return row["N"] * row["C"] * row["H"] * row["W"] * DTYPES[row["dtype"]].itemsize / 1e6


def parser_of(doc: str) -> argparse.ArgumentParser:
    """The static checks' command line: --arch, --out, --quick."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "static")
    parser.add_argument("--quick", action="store_true", help="three shapes, N=32, bfloat16")
    return parser


def main(argv=None) -> int:
    parser = parser_of(__doc__)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("static_check.py compiles the kernels: run it without TRITON_INTERPRET")
        return 2
    if not binder_available():
        import triton
        print(f"static_check.py drives triton's binder as triton 3.9 has it; triton "
              f"{triton.__version__} has not (run it where requirements/cpu.txt is installed)")
        return 2
    table = run(args.arch, args.quick, args.jobs)
    write(args.out, f"sm{args.arch}", COLUMNS, table, summary(table, args.arch))
    return 0


def write(out: Path, name: str, columns, table: list, text: str) -> None:
    """The table to out/<name>.csv (keys starting with _ left out) and the summary to
    out/summary_<name>.md; both printed where they went."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in table:
            writer.writerow({k: (f"{v:.3g}" if isinstance(v, float) else v)
                             for k, v in row.items() if not k.startswith("_")})
    (out / f"summary_{name}.md").write_text(text)
    print(text + f"{len(table)} rows written to {path}")


if __name__ == "__main__":
    sys.exit(main())
