"""bnkernels' build.

build_py ships csrc/ (the CUDA C++ backend's sources) inside the package, as
bnkernels/backends/cuda/csrc/, so that an installed package can compile the backend on
first use wherever nvcc is. Where nvcc is present at build time, it also compiles them into
bnkernels/backends/cuda/_lib/ for sm_80 and sm_90 (+ PTX for newer GPUs), so that
BNKERNELS_BACKEND=cuda needs no compile on first use. BNKERNELS_BUILD_CUDA=0 skips that
compile, =1 makes a failed build an error (by default it is a warning, and the backend
compiles csrc/ on first use instead)."""
import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PACKAGE_CUDA = Path("bnkernels") / "backends" / "cuda"


def _cuda_build():
    """bnkernels/backends/cuda/build.py, loaded by path: it needs neither torch nor the
    package."""
    spec = importlib.util.spec_from_file_location(
        "_bnkernels_cuda_build", HERE / "bnkernels" / "backends" / "cuda" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithCuda(build_py):
    def run(self):
        self._build_cuda()
        super().run()
        if not getattr(self, "editable_mode", False):  # editable: csrc/ is beside the package
            self._ship_sources()

    def _ship_sources(self):
        cuda_build = _cuda_build()
        target = Path(self.build_lib) / PACKAGE_CUDA / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for path in cuda_build.sources():
            shutil.copy2(path, target / path.name)

    def _build_cuda(self):
        wanted = os.environ.get("BNKERNELS_BUILD_CUDA", "auto")
        cuda_build = _cuda_build()
        if wanted == "0" or (wanted == "auto" and cuda_build.find_nvcc() is None):
            return
        try:
            built = cuda_build.build_prebuilt()
        except cuda_build.BuildError as error:
            if wanted == "1":
                raise
            self.warn(f"csrc/ was not built ({error}); BNKERNELS_BACKEND=cuda will compile "
                      "it on first use")
            return
        if not getattr(self, "editable_mode", False):  # editable: it stays in the tree
            target = Path(self.build_lib) / PACKAGE_CUDA / "_lib"
            target.mkdir(parents=True, exist_ok=True)
            for path in (built, cuda_build.PREBUILT_DIGEST):
                shutil.copy2(path, target / path.name)


setup(
    name="bnkernels",
    version="0.1.0",
    description="Fused Batch Normalization kernels for PyTorch, in Triton and CUDA C++",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["bnkernels", "bnkernels.*"]),
    package_data={"bnkernels.backends.cuda": ["_lib/*.so", "_lib/*.digest"]},
    cmdclass={"build_py": BuildPyWithCuda},
    python_requires=">=3.10",
    # torch is not pinned here: pick the build for your machine (see the README). The floors
    # are the oldest releases the whole suite has passed on (the README lists the runs):
    # Python 3.10, and torch 2.11 with the triton its CUDA wheels pin, 3.6.
    install_requires=["torch>=2.11", "triton>=3.6; platform_system == 'Linux'", "numpy"],
    extras_require={"test": ["pytest", "pytest-xdist", "hypothesis", "onnx", "onnxruntime",
                             "onnxscript", "scikit-learn", "matplotlib", "torchvision", "timm"],
                    "bench": ["matplotlib"]},
)
