"""How csrc/ becomes libbnkernels_cuda.so, and where the result is kept.

The sources: csrc/ at the top of a checkout, or bnkernels/backends/cuda/csrc/ in an
installed package (setup.py ships them there, so that a wheel built without nvcc can still
compile the backend on first use once nvcc is installed).

Two builds of the same source (csrc/*.cu, each a translation unit: batch_norm.cu, the C
ABI, and kernels_<type>.cu, one element type's kernels; compiled side by side, one
process per core, then linked):

  GPU        nvcc, for one architecture ("90": sm_90) or several (setup.py: sm_80 and
             sm_90, plus compute_90 PTX for newer GPUs). Plain CUDA C++ with the static
             CUDA runtime: no torch headers, so it builds where torch has no CUDA headers.
  emulate    the host compiler with -DBNK_EMULATE (csrc/emulate.h): the kernels' own code
             run on the CPU, each block's threads as fibers. For the CPU test suite.

A build is cached under BNKERNELS_CACHE_DIR (default ~/.cache/bnkernels) in a folder named
after a digest of the sources and the flags, so an edit makes a new build and nothing stale
is loaded. Beside the library, build.log keeps what the compiler printed (the emulation
build's -Wall -Wextra warnings: the test suite requires it to be empty). Processes that
want the same build at once (pytest's workers) take turns: one compiles, the others load.

This module imports neither torch nor bnkernels: setup.py loads it by path to build the
library into the package (PREBUILT) when nvcc is present.
    python -m bnkernels.backends.cuda [--arch 90 | --emulate]   builds into the cache
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Sequence

PACKAGE = Path(__file__).resolve().parent  # bnkernels/backends/cuda
CHECKOUT_CSRC = PACKAGE.parents[2] / "csrc"  # a checkout's (and an editable install's)
SHIPPED_CSRC = PACKAGE / "csrc"  # an installed package's copy (setup.py's build_py)
CSRC = SHIPPED_CSRC if (SHIPPED_CSRC / "bnk_api.h").exists() else CHECKOUT_CSRC
LIB_NAME = "libbnkernels_cuda.so"
PREBUILT = PACKAGE / "_lib" / LIB_NAME
PREBUILT_DIGEST = PREBUILT.with_suffix(".digest")
SETUP_ARCHS = ("80", "90")  # setup.py's build; sm_80 code also runs on sm_86/sm_89
NVCC_FLAGS = ("-O3", "-std=c++17", "-lineinfo", "-Xcompiler", "-fPIC")  # a unit's compile
# (-O1: the emulation runs the tests' small tensors; -O2 took twice as long to build.
# -Wall -Wextra: the warnings land in build.log, which the tests require to be empty.)
HOST_FLAGS = ("-O1", "-std=c++17", "-fPIC", "-DBNK_EMULATE", "-Wall", "-Wextra", "-x", "c++")


class BuildError(RuntimeError):
    """The library could not be built (no compiler, no CUDA headers, a compile error)."""


def sources() -> List[Path]:
    return sorted(p for p in CSRC.glob("*") if p.suffix in (".cu", ".cuh", ".h"))


def translation_units() -> List[Path]:
    return sorted(CSRC.glob("*.cu"))


@functools.lru_cache(maxsize=None)
def source_digest() -> Optional[str]:
    """A digest of csrc/ and of the flags it compiles with, or None where the sources are
    not beside the package."""
    files = sources()
    if not files:
        return None
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(repr((NVCC_FLAGS, HOST_FLAGS)).encode())
    return h.hexdigest()[:16]


def find_nvcc() -> Optional[str]:
    explicit = os.environ.get("BNKERNELS_NVCC")
    if explicit:
        return explicit if shutil.which(explicit) else None
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


def cuda_include_dir() -> Optional[Path]:
    """Where cuda_fp16.h is (the emulation build needs the CUDA headers, not nvcc)."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = find_nvcc()
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parent.parent))
    for root in filter(None, roots):
        include = Path(root) / "include"
        if (include / "cuda_fp16.h").exists():
            return include
    return None


def gencode_flags(archs: Sequence[str], ptx: bool) -> List[str]:
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    if ptx:  # JIT-compiled by the driver on GPUs newer than the last arch
        flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


class Build(NamedTuple):
    """How each translation unit compiles to an object, and the objects link."""
    compile: Callable[[Path, Path], List[str]]  # (unit, object) -> argv
    link: Callable[[List[Path], Path], List[str]]  # (objects, library) -> argv


def gpu_build(archs: Sequence[str], ptx: bool = False) -> Build:
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found: install the CUDA toolkit (or set BNKERNELS_NVCC or "
                         "CUDA_HOME, or put nvcc on PATH); the next BNKERNELS_BACKEND=cuda "
                         "call then builds the library, or build it ahead of time with "
                         "`python -m bnkernels.backends.cuda --arch <major><minor>`")
    gencode = gencode_flags(archs, ptx)
    return Build(lambda unit, obj: [nvcc, "-c", *NVCC_FLAGS, *gencode, "-o", str(obj), str(unit)],
                 lambda objs, out: [nvcc, "-shared", *gencode, "-o", str(out), *map(str, objs)])


def host_compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise BuildError("no C++ compiler found (set CXX)")
    return compiler


def emulation_build() -> Build:
    include = cuda_include_dir()
    if include is None:
        raise BuildError("the CUDA headers (cuda_fp16.h) were not found: set CUDA_HOME")
    cxx = host_compiler()
    return Build(lambda unit, obj: [cxx, "-c", *HOST_FLAGS, f"-I{include}", "-o", str(obj),
                                    str(unit)],
                 lambda objs, out: [cxx, "-shared", "-o", str(out), *map(str, objs)])


def _run(argv: List[str]) -> str:
    """Runs a compile or link step; returns what it printed on stderr (its warnings)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True)
    except OSError as error:  # the compiler named is not there
        raise BuildError(f"{argv[0]} could not be run: {error}") from None
    if done.returncode != 0:
        raise BuildError(f"{Path(argv[0]).name} failed ({done.returncode}):\n"
                         f"{(done.stderr or done.stdout)[-4000:]}")
    return done.stderr


def compile_to(out: Path, build: Build, log: Optional[Path] = None) -> Path:
    """Compiles every translation unit (one process per core), links them into a
    temporary path, then moves it to out in one step: concurrent builds never load a
    partial file. log, where given, receives what the compiler and linker printed."""
    if source_digest() is None:
        raise BuildError(f"the csrc/ sources are not beside the package ({CSRC})")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        units = translation_units()
        objects = [Path(tmp) / f"{unit.stem}.o" for unit in units]
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            printed = list(pool.map(lambda pair: _run(build.compile(*pair)),
                                    zip(units, objects)))
        library = Path(tmp) / LIB_NAME
        printed.append(_run(build.link(objects, library)))
        os.chmod(library, 0o755)
        if log is not None:
            log.write_text("".join(printed))
        os.replace(library, out)
    return out


def cache_dir() -> Path:
    root = os.environ.get("BNKERNELS_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "bnkernels"


def cached_path(kind: str) -> Path:
    """kind: "emulate", or a GPU arch such as "90"."""
    return cache_dir() / f"{source_digest()}-{kind}" / LIB_NAME


def prebuilt_is_current() -> bool:
    """setup.py's build, made from the sources beside it (or with none to compare)."""
    if not PREBUILT.exists():
        return False
    digest = source_digest()
    if digest is None:
        return True  # an installed wheel: the library is all there is
    return PREBUILT_DIGEST.exists() and PREBUILT_DIGEST.read_text().strip() == digest


def build_log(kind: str) -> Path:
    """What the compiler printed while making cached_path(kind)."""
    return cached_path(kind).with_name("build.log")


@contextlib.contextmanager
def _one_build_at_a_time(lock: Path):
    """An exclusive lock on a file, across processes: pytest's workers (or a job's ranks)
    that need the same build wait for the first one's instead of compiling it beside it,
    each at half the speed. Without fcntl (not POSIX) they just build side by side."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # released when the file closes
        yield


def build_cached(kind: str) -> Path:
    """The cached build for kind, compiled first if missing (by one process at a time)."""
    path = cached_path(kind)
    if path.exists():
        return path
    with _one_build_at_a_time(path.parent.with_name(path.parent.name + ".lock")):
        if not path.exists():  # (or another process built it while this one waited)
            build = emulation_build() if kind == "emulate" else gpu_build([kind])
            compile_to(path, build, log=build_log(kind))
    return path


def build_prebuilt() -> Path:
    """setup.py: every SETUP_ARCHS, plus PTX, into bnkernels/_lib/ with its digest."""
    compile_to(PREBUILT, gpu_build(SETUP_ARCHS, ptx=True))
    PREBUILT_DIGEST.write_text(source_digest() + "\n")
    return PREBUILT


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--arch", help="GPU architecture, e.g. 90 for sm_90")
    group.add_argument("--emulate", action="store_true", help="the CPU emulation build")
    group.add_argument("--prebuilt", action="store_true", help="what setup.py builds")
    args = parser.parse_args(argv)
    try:
        if args.prebuilt:
            path = build_prebuilt()
        else:
            path = build_cached("emulate" if args.emulate else (args.arch or "90"))
    except BuildError as error:
        print(error, file=sys.stderr)
        return 1
    print(path)
    return 0
