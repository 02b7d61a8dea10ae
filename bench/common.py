"""What every benchmark row carries: the device, versions and commit it was measured at."""
import contextlib
import csv
import os
import platform
import subprocess
from pathlib import Path

import torch


# The bench providers that are bnkernels, and the BNKERNELS_BACKEND each runs with.
BNKERNELS_PROVIDERS = {"bnkernels_triton": "triton", "bnkernels_cuda": "cuda",
                       "bnkernels_triton_3k": "triton"}
# Providers that run with the Triton backend's persistent pass off (the three kernels
# each pass, where bnkernels_triton may take one launch: persistent_plan.py).
THREE_KERNEL_PROVIDERS = {"bnkernels_triton_3k"}


@contextlib.contextmanager
def backend_for(provider: str):
    """BNKERNELS_BACKEND set for a bnkernels provider (read by every bnkernels call, the
    backward included), as it was for any other."""
    name = BNKERNELS_PROVIDERS.get(provider)
    before = os.environ.get("BNKERNELS_BACKEND")
    if name:
        os.environ["BNKERNELS_BACKEND"] = name
    plan = None
    if provider in THREE_KERNEL_PROVIDERS:
        from bnkernels.backends.triton import persistent_plan as plan
        mode, plan.MODE = plan.MODE, "off"
    try:
        yield
    finally:
        if plan is not None:
            plan.MODE = mode
        if before is None:
            os.environ.pop("BNKERNELS_BACKEND", None)
        else:
            os.environ["BNKERNELS_BACKEND"] = before


def emulate_on_cpu() -> None:
    """A CPU smoke run: both backends' kernels on CPU tensors (the Triton interpreter, the
    emulation build of csrc/); set before bnkernels' Triton module is imported."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("BNKERNELS_CUDA_EMULATE", "1")


def commit() -> str:
    """The commit measured: BNKERNELS_COMMIT where the tree travelled without .git."""
    if os.environ.get("BNKERNELS_COMMIT"):
        return os.environ["BNKERNELS_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "_")
    return f"cpu_{platform.machine()}_x{torch.get_num_threads()}threads"


def results_dir_name(device: str) -> str:
    """bench/results/<this>: h100, h200, a100, ... or cpu."""
    if device != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name()
    for tag in ("H100", "H200", "A100", "L40S", "L4"):
        if tag in name:
            return tag.lower()
    return device_name(device).lower()


def results_path(out_dir, device: str, filename: str) -> Path:
    """out_dir/filename, out_dir defaulting to bench/results/<device's folder>
    (results_dir_name)."""
    out = out_dir or Path(__file__).resolve().parent / "results" / results_dir_name(device)
    return out / filename


def append_rows(out_dir, device: str, filename: str, columns, rows) -> Path:
    """Appends rows to results_path(out_dir, device, filename); returns the path."""
    path = results_path(out_dir, device, filename)
    with csv_rows(path, columns) as emit:
        for row in rows:
            emit(row)
    return path


@contextlib.contextmanager
def csv_rows(path, columns):
    """Append rows to the CSV at path (header first if it is new): yields emit(row), which
    writes and flushes each row at once, so a long run keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()

        def emit(row):
            writer.writerow({k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in row.items()})
            f.flush()

        yield emit
