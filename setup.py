from setuptools import find_packages, setup

setup(
    name="bnkernels",
    version="0.1.0",
    description="Fused Batch Normalization kernels for PyTorch, in Triton",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["bnkernels", "bnkernels.*"]),
    python_requires=">=3.10",
    # torch is not pinned here: pick the build for your machine (see the README).
    install_requires=["torch>=2.6", "triton>=3.6; platform_system == 'Linux'", "numpy"],
    extras_require={"test": ["pytest", "pytest-xdist", "hypothesis", "onnx", "onnxruntime",
                             "onnxscript"],
                    "bench": ["matplotlib"]},
)
