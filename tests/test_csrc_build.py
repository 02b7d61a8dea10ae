"""csrc/ compiles: every *.cu with nvcc for sm_80 and sm_90 (warnings are errors, no
register spills), and the emulation build with the host compiler (-Wall -Wextra, and not a
word printed).
So a syntax error in the CUDA C++ backend can't land, though CI has no GPU to run it on."""
import re
import subprocess

import pytest

from bnkernels.backends.cuda import build as cuda_build

NVCC = cuda_build.find_nvcc()
UNITS = cuda_build.translation_units()


def test_there_is_something_to_compile():
    assert [p.name for p in UNITS] == ["batch_norm.cu", "kernels_bf16.cu", "kernels_f16.cu",
                                       "kernels_f32.cu", "kernels_f64.cu"]


_TYPES = {"kernels_f32.cu": "f", "kernels_f64.cu": "d", "kernels_f16.cu": "6__half",
          "kernels_bf16.cu": "13__nv_bfloat16"}  # each's element type, mangled


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_nvcc_compiles_without_warnings_or_spills(unit, arch, tmp_path):
    build = cuda_build.gpu_build([arch])
    command = build.compile(unit, tmp_path / "unit.o") + ["-Werror", "all-warnings", "-Xptxas",
                                                          "-v"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    report = done.stderr
    kernels = re.findall(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", report)
    if unit.name == "batch_norm.cu":  # the C ABI: no kernel
        assert not kernels
        return
    assert kernels and {a for _, a in kernels} == {arch}
    # every kernel, in the unit's element type only: its vectors, layouts and epilogues
    mangled = _TYPES[unit.name]
    for name in ("reduce_stats_kernel", "reduce_grads_kernel", "merge_kernel",
                 "apply_normalize_kernel", "apply_input_grad_kernel"):
        of_name = [k for k, _ in kernels if name in k]
        assert of_name and all(f"I{mangled}" in k for k in of_name), name
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(spills) == len(kernels) and all(s == ("0", "0") for s in spills), report


@pytest.mark.skipif(cuda_build.cuda_include_dir() is None, reason="no CUDA headers")
def test_emulation_build_compiles_cleanly():
    """The emulation build the suite runs on (the cached one, which the workers share)
    compiles with -Wall -Wextra, and its build.log holds everything the compiler and the
    linker printed: empty, as strict as -Werror without a second build."""
    command = cuda_build.emulation_build().compile(UNITS[0], cuda_build.CSRC / "unit.o")
    assert {"-Wall", "-Wextra"} <= set(command)
    assert cuda_build.build_cached("emulate").is_file()
    assert cuda_build.build_log("emulate").read_text() == ""


EMULATOR_CHECK = r"""
#include <cstdio>
#include "portable.cuh"

// A block sum through "shared" memory, and a kernel whose thread 0 leaves before a barrier.
BNK_GLOBAL void block_sum(int* out) {
  BNK_SHARED int partial[64];
  partial[threadIdx.x] = blockIdx.x * 100 + threadIdx.x;
  bnk_sync();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    bnk_sync();
  }
  if (threadIdx.x == 0) out[blockIdx.x + gridDim.x * blockIdx.y] = partial[0];
}

BNK_GLOBAL void divergent(int* out) {
  if (threadIdx.x == 0) return;
  bnk_sync();
  out[0] = 1;
}

int main() {
  int sums[6] = {0};
  int ok = BNK_LAUNCH(block_sum, dim3(3, 2), dim3(64), nullptr, sums);
  int bad = BNK_LAUNCH(divergent, dim3(1), dim3(8), nullptr, sums);
  printf("%d %d", ok, bad);
  for (int s : sums) printf(" %d", s);
  return 0;
}
"""


@pytest.mark.skipif(cuda_build.cuda_include_dir() is None, reason="no CUDA headers")
def test_emulator_shares_block_memory_and_catches_divergent_barriers(tmp_path):
    """What the CPU test suite relies on: a block's threads share its static arrays and
    meet at each barrier; a barrier only some threads reach is an error, not a hang."""
    source = tmp_path / "check.cpp"
    source.write_text(EMULATOR_CHECK)
    binary = tmp_path / "check"
    build = subprocess.run(
        [cuda_build.host_compiler(), "-std=c++17", "-O1", "-DBNK_EMULATE",
         f"-I{cuda_build.CSRC}", f"-I{cuda_build.cuda_include_dir()}", "-o", str(binary),
         str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    ok, bad, *sums = map(int, subprocess.run([str(binary)], capture_output=True, text=True,
                                             check=True).stdout.split())
    assert ok == 0 and bad != 0  # BNK_EMU_DIVERGENT_BARRIER
    # block (bx, by) sums bx*100*64 + (0 + ... + 63), with bx the grid's x index
    assert sums == [bx * 6400 + 2016 for by in range(2) for bx in range(3)]
