"""Compiles kernel variants (JSON on stdin, from test_gpu_compile.py) for one GPU
architecture (argv[1], e.g. 90) with triton's real compiler, each specialised by Triton's
binder from its recorded arguments as a GPU launch would be; prints, as JSON, each
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
from triton.compiler import ASTSource, make_backend

import torch

from bnkernels.backends.triton import kernels as triton_kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import static_check  # noqa: E402

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


class _Pointer:
    """A tensor argument as Triton's binder sees it: a dtype and an address (0: 16-byte
    aligned, 4: not)."""

    def __init__(self, dtype: str, aligned: bool):
        self.dtype = getattr(torch, dtype)
        self._address = 0 if aligned else 4

    def data_ptr(self) -> int:
        return self._address


def main() -> None:
    arch = int(sys.argv[1])
    backend = make_backend(GPUTarget("cuda", arch, 32))
    results = []
    for variant in json.load(sys.stdin):
        kernel = getattr(triton_kernels, variant["kernel"])
        meta = {k: _DTYPES.get(v, v) if isinstance(v, str) else v
                for k, v in variant["constexprs"].items()}
        meta["num_warps"] = variant["num_warps"]
        args = [_Pointer(a["dtype"], a["aligned"]) if isinstance(a, dict) else a
                for a in variant["args"]]
        # what JITFunction.run would compile for these arguments on a GPU
        _, (name, signature, constexprs, attrs, options) = static_check._specialised(
            kernel, args, meta, backend)
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        results.append({"kernel": variant["kernel"], "constexprs": variant["constexprs"],
                        "divisible": sum("tt.divisibility" in repr(v) for v in attrs.values()),
                        **resource_usage(compiled.asm["cubin"])})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
