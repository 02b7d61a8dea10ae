"""csrc/ compiles: every *.cu with nvcc for sm_80 and sm_90 (warnings are errors, no
register spills), and the emulation build with the host compiler (-Wall -Wextra -Werror).
So a syntax error in the CUDA C++ backend can't land, though CI has no GPU to run it on."""
import re
import subprocess

import pytest

from bnkernels import cuda_build

NVCC = cuda_build.find_nvcc()
UNITS = cuda_build.translation_units()


def test_there_is_something_to_compile():
    assert [p.name for p in UNITS] == ["batch_norm.cu"]


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_nvcc_compiles_without_warnings_or_spills(unit, arch, tmp_path):
    command = [NVCC, "-c", *cuda_build.NVCC_FLAGS, *cuda_build.gencode_flags([arch], ptx=False),
               "-Werror", "all-warnings", "-Xptxas", "-v", "-o", str(tmp_path / "unit.o"),
               str(unit)]
    command.remove("-shared")  # an object file is enough to compile every kernel
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    report = done.stderr
    kernels = re.findall(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", report)
    assert kernels and {a for _, a in kernels} == {arch}
    for name in ("stats_kernel", "grad_sums_kernel", "merge_kernel", "normalize_kernel",
                 "input_grad_kernel"):  # each in 4 dtypes
        assert sum(name in k for k, _ in kernels) == 4, name
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(spills) == len(kernels) and all(s == ("0", "0") for s in spills), report


@pytest.mark.skipif(cuda_build.cuda_include_dir() is None, reason="no CUDA headers")
def test_emulation_build_compiles_cleanly(tmp_path):
    command = cuda_build.emulation_command(tmp_path / "lib.so") + ["-Wall", "-Wextra", "-Werror"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
