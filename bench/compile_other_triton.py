"""The static checks' kernel variants compiled by another triton: the GPU machine's 3.6.

    python bench/compile_other_triton.py record FILE [--quick]     (triton 3.9: this venv)
    OTHER/bin/python bench/compile_other_triton.py compile FILE [--arch 90] [--out DIR]

Why: the kernels must compile with the GPU machine's triton (3.6) as well as the newest,
and a variant that fails there would cost GPU time to find. static_check.py and
static_check_persistent.py specialise every launch of ResNet-50's BN passes with triton
3.9's binder (pointer alignment, integers divisible by 16 or equal to 1), which 3.6 lacks.
So `record` specialises them here, as static_check does (the three-kernel passes: every
pass, N = 32 and 128, three dtypes, both layouts; the persistent pass: its four passes,
bfloat16 and float32) and writes each variant as JSON; `compile`, run by the other
triton's Python (PYTHONPATH=. from the checkout), compiles each for the architecture with
triton.compile and reads the cubin as static_check does: registers, spills, shared
memory, the loops' narrowest global access, and the persistent kernel's barrier ordering
(static_check_persistent.read_barrier). It writes summary_triton<version>_sm<arch>.md
(default bench/results/static/) and exits non-zero if a variant failed, spilled, or has a
barrier access out of order.
--quick records static_check's quick set (three shapes, N = 32, bfloat16), for the tests.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the launch options the other triton is given: the rest (paths to this triton's libdevice,
# its arch string, options 3.6 lacks) it derives itself
OPTIONS = ("num_warps", "num_ctas", "num_stages", "maxnreg", "enable_fp_fusion", "debug",
           "sanitize_overflow")
DTYPE_PREFIX = "triton.language."


def record(path: Path, quick: bool = False) -> int:
    import static_check
    import static_check_persistent
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    backend = make_backend(GPUTarget("cuda", 90, 32))
    variants: dict = {}
    static_check.record_passes(quick, backend, variants)  # first: the three kernels
    three = len(variants)
    static_check_persistent.record_passes(quick, backend, variants)
    encoded = [{"name": name, "signature": dict(signature),
                "constexprs": [[list(k), _encode(v)] for k, v in constexprs.items()],
                "attrs": [[list(k), [list(a) for a in v]] for k, v in attrs.items()],
                "options": {k: options[k] for k in OPTIONS if k in options}}
               for name, signature, constexprs, attrs, options in variants.values()]
    path.write_text(json.dumps(encoded))
    print(f"{len(encoded)} variants ({three} of the three-kernel passes) written to {path}")
    return 0


def _encode(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return DTYPE_PREFIX + str(value)  # a triton dtype, by its name ("fp32")


def _decode(value):
    import triton.language as tl
    if isinstance(value, str) and value.startswith(DTYPE_PREFIX):
        return tl.dtype(value[len(DTYPE_PREFIX):])
    return value


def _compile_one(arch: int, item: dict) -> dict:
    import static_check
    from static_check_persistent import BARRIER_COLUMNS, read_barrier  # (no binder needed)
    persistent = item["name"] == "_persistent_kernel"
    variant = (item["name"], item["signature"],
               {tuple(k): _decode(v) for k, v in item["constexprs"]},
               {tuple(k): [tuple(a) for a in v] for k, v in item["attrs"]}, item["options"])
    start = time.perf_counter()
    try:
        read = static_check._compile(arch, variant, read_barrier if persistent else None)
    except Exception as error:  # reported, with the variant's name
        return {"name": item["name"], "error": f"{type(error).__name__}: {error}"[:500]}
    loads = [loop["access_bits"] for loop in read["loops"] if loop["access_bits"]]
    return {"name": item["name"], "seconds": time.perf_counter() - start, "regs": read["regs"],
            "spills": read["spills"], "shared": read["shared"], "loops": len(loads),
            "loops_128": sum(bits == 128 for bits in loads),
            **{k: read[k] for k in BARRIER_COLUMNS if persistent}}


def compile_all(path: Path, arch: int, out: Path, jobs: int, limit: int = 0) -> int:
    import triton
    import common
    import static_check_persistent
    items = json.loads(path.read_text())
    items = items[:limit] if limit else items
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # cold: every variant really compiles
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(_compile_one, [arch] * len(items), items))
    wall = time.perf_counter() - start
    failed = [r for r in results if "error" in r]
    done = [r for r in results if "error" not in r]
    seconds = sorted(r["seconds"] for r in done) or [0.0]
    by_kernel: dict = {}
    for r in done:
        by_kernel.setdefault(r["name"], []).append(r)
    lines = [f"# {len(items)} kernel variants compiled for sm_{arch} by triton "
             f"{triton.__version__}", "",
             f"Recorded with triton 3.9's binder, compiled by triton {triton.__version__} "
             f"(commit {common.commit()}; bench/compile_other_triton.py).", "",
             f"- failed to compile: {len(failed)}",
             f"- spilling: {sum(r['spills'] > 0 for r in done)}",
             f"- registers: at most {max((r['regs'] for r in done), default=0)}",
             f"- shared memory: at most {max((r['shared'] for r in done), default=0)} bytes",
             f"- time per variant, cold cache (triton.compile, then cuobjdump's reads): median "
             f"{seconds[len(seconds) // 2]:.2f} s, at most {seconds[-1]:.2f} s; {wall:.0f} s "
             f"in all on {jobs} processes", "",
             "Loops: those with a global load or store (the persistent kernel's include its "
             "merge, over 32-bit partials, beside its reduce and apply).", "",
             "| kernel | variants | max registers | spilling | loops | of them 128 bits wide |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, rows in sorted(by_kernel.items()):
        lines.append(f"| {name} | {len(rows)} | {max(r['regs'] for r in rows)} | "
                     f"{sum(r['spills'] > 0 for r in rows)} | {sum(r['loops'] for r in rows)} | "
                     f"{sum(r['loops_128'] for r in rows)} |")
    barriers = by_kernel.get("_persistent_kernel", [])
    if barriers:
        lines += ["", f"The persistent kernel's grid barrier, read from the PTX as "
                  f"static_check_persistent.py reads it: "
                  f"{static_check_persistent.barrier_summary(barriers, 'variant')}."]
    lines += [""] + [f"- FAILED {r['name']}: {r['error']}" for r in failed[:20]]
    text = "\n".join(lines).rstrip() + "\n"
    out.mkdir(parents=True, exist_ok=True)
    major_minor = "".join(triton.__version__.split(".")[:2])
    target = out / f"summary_triton{major_minor}_sm{arch}.md"
    target.write_text(text)
    print(text + f"written to {target}")
    unordered = static_check_persistent.barrier_out_of_order(barriers)
    return 1 if failed or unordered or any(r["spills"] for r in done) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["record", "compile"])
    parser.add_argument("file", type=Path)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "static")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="record: the quick set")
    parser.add_argument("--limit", type=int, default=0, help="compile: the first N only")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_other_triton.py compiles the kernels: run it without TRITON_INTERPRET")
        return 2
    if args.mode == "record":
        import static_check
        if not static_check.binder_available():
            print("record needs triton 3.9's binder (requirements/cpu.txt's triton)")
            return 2
        return record(args.file, args.quick)
    return compile_all(args.file, args.arch, args.out, args.jobs, args.limit)


if __name__ == "__main__":
    sys.exit(main())
