"""Static check of the persistent training pass (bnkernels/backends/triton/persistent.py).

    python bench/static_check_persistent.py --arch 90 [--out DIR] [--quick] [--jobs 2]

No GPU needed. The persistent kernel's grid barrier needs every program of a launch
resident at once, so what decides whether it can run is the compiled kernel's occupancy;
this reads it offline. Each training pass (fwd_train, bwd, and the fused bnaddrelu_*) of
ResNet-50's twelve BN shapes at N = 32 and 128, bfloat16 and float32, NCHW and
channels_last, is called through bnkernels on CPU tensors with the persistent path forced
on (persistent_plan.MODE "on", one launch: PHASE 0, with the trap) and the GPU's plan
(static_check._record); its launch is specialised by Triton's binder and compiled for the
architecture (static_check._compile). Per pass:

  tensor_mb        the input tensor's MB
  auto             1 where persistent_plan's size rule takes the path on an H100 (the bytes
                   read twice <= L2_FRACTION of 50 MB), 0 where the three kernels run
  programs         the grid (channel blocks x splits)
  resident         programs an H100 holds at once: 132 SMs x the per-SM limit of the
                   compiled kernel's registers, threads and shared memory
                   (static_check.resident_programs); the path needs programs <= resident
  regs, spills, shared   as static_check.py reads them
  loops, loops_128 the kernel's loops, and those whose every global access is 128 bits
                   wide: the reduce's and the apply's; the others are the merge step's
                   loop over the splits (32-bit partials, as the merge kernel's) and the
                   barriers' spin loops (one 32-bit atomic load)

  acquires, releases   the barrier's ordering, read from the PTX (read_barrier): its
                   gpu-scope acquire operations (the generation's loads, the arrivals'
                   acq_rel adds) and release operations (the arrivals, the generation's
                   bump, the error flag's exchange)
  unfenced         those of them not fenced by CTA barriers (bar.sync), as the pattern of
                   a grid barrier needs: one thread releases at gpu scope what the
                   program's threads wrote only after a bar.sync, and the others read
                   what other programs wrote only after a bar.sync that follows the
                   acquire (between the two, only that thread's own accesses, which
                   program order keeps in place: read_barrier). 0 in every pass
  nc_loads         loads through the non-coherent read-only path (PTX ld.global.nc, SASS
                   LDG...CONSTANT), which could return partials or statistics written by
                   another program during the launch stale. 0 in every pass
  l1_invalidates   CCTL.IVALL in the SASS: the L1 invalidation by which ptxas makes the
                   weak loads after an acquire see other SMs' writes

Rows go to DIR/persistent_sm<arch>.csv (default bench/results/static/), the summary to
summary_persistent_sm<arch>.md.
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import static_check  # noqa: E402
from static_check import (DTYPES, LAYOUTS, SMS, _compile, _record, binder_available,  # noqa: E402
                          parser_of, write)
from bench_bn import QUICK_SHAPES, RESNET50_SHAPES  # noqa: E402

COLUMNS = ["pass", "dtype", "layout", "N", "C", "H", "W", "tensor_mb", "auto", "programs",
           "resident", "regs", "spills", "shared", "loops", "loops_128", "acquires",
           "releases", "unfenced", "nc_loads", "l1_invalidates"]
BARRIER_COLUMNS = COLUMNS[-5:]  # read_barrier's
PASSES = ["fwd_train", "bwd", "bnaddrelu_fwd_train", "bnaddrelu_bwd"]
L2_BYTES = 50 * 1024 * 1024  # an H100's


def record_passes(quick: bool, backend, variants: dict) -> list:
    """_record of this check's set, with the persistent pass forced on in its GPU variant
    (which stays so: record static_check's passes first): its passes on ResNet-50's shapes
    at N = 32 and 128, bfloat16 and float32 (quick: three shapes, N = 32, bfloat16)."""
    from bnkernels.backends.triton import persistent_plan
    persistent_plan.MODE, persistent_plan.INTERPRETER_PHASES = "on", False
    persistent_plan.TRAP_ON_CPU = True  # the GPU's variant: a barrier that gives up traps
    shapes, batches, dtypes = ((QUICK_SHAPES, [32], ["bfloat16"]) if quick else
                               (RESNET50_SHAPES, [32, 128], ["bfloat16", "float32"]))
    return _record(PASSES, shapes, batches, dtypes, LAYOUTS, backend, variants)


# PTX lines: a CTA barrier, a global memory access (any ld/st/atom/red/cp.async that names
# the global space, with its predicate), and the ordering qualifiers of an access
_CTA_BARRIER = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:bar|barrier)\.sync\b")
_GLOBAL_ACCESS = re.compile(
    r"^\s*(@!?%p\d+\s+)?(?:ld|st|atom|red|cp\.async)\.[\w.]*\bglobal\b")
_ACQUIRE = re.compile(r"\.(?:gpu|sys)\.(?:acquire|acq_rel)\.|\.(?:acquire|acq_rel)\.(?:gpu|sys)\.")
_RELEASE = re.compile(r"\.(?:gpu|sys)\.(?:release|acq_rel)\.|\.(?:release|acq_rel)\.(?:gpu|sys)\.")


def read_barrier(ptx: str, sass: str) -> dict:
    """The grid barrier's memory ordering in a kernel's PTX and SASS (the columns of the
    module docstring). A release is fenced where only its own thread's accesses (the same
    predicate: program order) lie between it and the CTA barrier before it; an acquire,
    where only its own thread's lie between it and the CTA barrier after it. The text is
    read in order, which is the code's order for the barrier (straight-line but for its
    spin loop, which branches back over its one load)."""
    lines = [line for line in ptx.splitlines()
             if _CTA_BARRIER.match(line) or _GLOBAL_ACCESS.match(line)]

    def fenced(i: int, step: int) -> bool:
        predicate = _GLOBAL_ACCESS.match(lines[i]).group(1)
        j = i + step
        while 0 <= j < len(lines) and not _CTA_BARRIER.match(lines[j]):
            if _GLOBAL_ACCESS.match(lines[j]).group(1) != predicate or predicate is None:
                return False  # another thread's access, not ordered by this one
            j += step
        return 0 <= j < len(lines)

    acquires = releases = unfenced = 0
    for i, line in enumerate(lines):
        if _CTA_BARRIER.match(line):
            continue
        if _RELEASE.search(line):
            releases += 1
            unfenced += not fenced(i, -1)
        if _ACQUIRE.search(line):
            acquires += 1
            unfenced += not fenced(i, +1)
    nc_loads = len(re.findall(r"\bld\.global(?:\.\w+)*\.nc\b", ptx))
    nc_loads += len(re.findall(r"\bLDG(?:\.\w+)*\.CONSTANT\b", sass))
    return {"acquires": acquires, "releases": releases, "unfenced": unfenced,
            "nc_loads": nc_loads, "l1_invalidates": len(re.findall(r"\bCCTL\.IVALL\b", sass))}


def run(arch: int, quick: bool, jobs: int) -> list:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from bnkernels.backends.triton import persistent_plan
    backend = make_backend(GPUTarget("cuda", arch, 32))
    variants: dict = {}
    calls = record_passes(quick, backend, variants)
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {key: pool.submit(_compile, arch, v,
                                    read_barrier if key[0] == "_persistent_kernel" else None)
                   for key, v in variants.items()}
        reads = {key: f.result() for key, f in futures.items()}
    table = []
    for name, dtype, layout, n, c, h, w, launches in calls:
        mine = [launch for launch in launches if launch.kernel == "_persistent_kernel"]
        if not mine:  # one split: no merge, the three-kernel path's two launches
            continue
        launch, = mine
        read = reads[launch.key]
        programs = launch.grid[0] * launch.grid[1]
        threads = 32 * launch.meta["num_warps"]
        per_sm = static_check.resident_programs(read["regs"], threads, read["shared"],
                                                static_check.BLOCKS_PER_SM * SMS)
        nbytes = n * c * h * w * DTYPES[dtype].itemsize
        twice = nbytes * (2 if name.endswith("bwd") else 1)
        table.append({"pass": name, "dtype": dtype, "layout": layout, "N": n, "C": c,
                      "H": h, "W": w, "tensor_mb": nbytes / 1e6,
                      "auto": int(twice <= persistent_plan.L2_FRACTION * L2_BYTES),
                      "programs": programs, "resident": per_sm * SMS, "regs": read["regs"],
                      "spills": read["spills"], "shared": read["shared"],
                      "loops": len(read["loops"]),
                      "loops_128": sum(loop["access_bits"] == 128 for loop in read["loops"]),
                      **{k: read[k] for k in BARRIER_COLUMNS}})
    return table


def summary(table: list, arch: int) -> str:
    import common
    taken = [r for r in table if r["auto"]]
    lines = [f"# Persistent pass, static check, sm_{arch}: {len(table)} passes", "",
             f"Compiled offline (no GPU) by triton {common.triton_version()}, commit "
             f"{common.commit()} (bench/static_check_persistent.py).", "",
             f"- passes the size rule takes on an H100: {len(taken)} of {len(table)}",
             f"- of those, a grid larger than the programs an H100 holds at once (the path "
             f"then falls back to three kernels): "
             f"{sum(r['programs'] > r['resident'] for r in taken)}",
             f"- passes that spill: {sum(r['spills'] > 0 for r in table)}",
             f"- loops 128 bits wide (the reduce's and the apply's): "
             f"{sum(r['loops_128'] for r in table)} of {sum(r['loops'] for r in table)}; "
             f"passes with fewer than 2: {sum(r['loops_128'] < 2 for r in table)}",
             f"- registers: at most {max((r['regs'] for r in table), default=0)}",
             f"- the barrier's ordering (PTX): {barrier_summary(table, 'pass')}", ""]
    return "\n".join(lines)


def barrier_out_of_order(rows: list) -> bool:
    """Whether a row of read_barrier's columns has an access unfenced or non-coherent."""
    return any(r["unfenced"] or r["nc_loads"] for r in rows)


def barrier_summary(rows: list, per: str) -> str:
    """read_barrier's columns over rows (passes here, variants in compile_other_triton)."""
    def span(column):
        values = [r[column] for r in rows] or [0]
        low, high = min(values), max(values)
        return str(low) if low == high else f"{low} to {high}"
    return (f"gpu-scope acquires {span('acquires')} and releases {span('releases')} a "
            f"{per}; not fenced by CTA barriers: {sum(r['unfenced'] for r in rows)}; loads "
            f"through the non-coherent path: {sum(r['nc_loads'] for r in rows)}; L1 "
            f"invalidations (CCTL.IVALL) {span('l1_invalidates')} a {per}")


def main(argv=None) -> int:
    parser = parser_of(__doc__)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or not binder_available():
        print("static_check_persistent.py compiles the kernels with triton 3.9's binder: run "
              "it without TRITON_INTERPRET, where requirements/cpu.txt is installed")
        return 2
    table = run(args.arch, args.quick, args.jobs)
    write(args.out, f"persistent_sm{args.arch}", COLUMNS, table, summary(table, args.arch))
    return 1 if barrier_out_of_order(table) else 0


if __name__ == "__main__":
    sys.exit(main())
