"""Compiles kernel variants (JSON on stdin, from test_gpu_compile.py) for one GPU
architecture (argv[1], e.g. 90) with triton's real compiler; prints, as JSON, each
variant's registers and local memory (spills), read from the cubin by the cuobjdump
triton bundles (CompiledKernel's n_regs/n_spills need a GPU to load the kernel).
Run without TRITON_INTERPRET."""
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bnkernels.backends.triton import kernels as triton_kernels

_DTYPES = {str(d): d for d in (tl.float32, tl.float64)}


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia
    bundled = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """{"registers": REG, "spills": LOCAL bytes} of the cubin's kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|LOCAL):(\d+)", out))
    return {"registers": int(usage["REG"]), "spills": int(usage.get("LOCAL", 0))}


def main() -> None:
    arch = int(sys.argv[1])
    results = []
    for variant in json.load(sys.stdin):
        kernel = getattr(triton_kernels, variant["kernel"])
        constexprs = {k: _DTYPES.get(v, v) if isinstance(v, str) else v
                      for k, v in variant["constexprs"].items()}
        source = ASTSource(fn=kernel, signature=variant["signature"], constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": variant["num_warps"]})
        results.append({"kernel": variant["kernel"], "constexprs": variant["constexprs"],
                        **resource_usage(compiled.asm["cubin"])})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
