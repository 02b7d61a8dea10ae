"""What every benchmark row carries: the device, versions and commit it was measured at."""
import contextlib
import csv
import os
import platform
import subprocess

import torch


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
