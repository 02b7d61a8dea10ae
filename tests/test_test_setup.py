"""The test setup itself (conftest.py): how the pytest-xdist workers share the cores."""
import os

import pytest
import torch
from conftest import _usable_cores


def test_usable_cores_is_capped_by_a_cgroup_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert _usable_cores(cpu_max) == affinity
    cpu_max.write_text("100000 100000\n")  # one core's worth
    assert _usable_cores(cpu_max) == 1
    cpu_max.write_text("50000 100000\n")  # half a core still gets a thread
    assert _usable_cores(cpu_max) == 1
    cpu_max.write_text(f"{(affinity + 8) * 100000} 100000\n")  # more than it may run on
    assert _usable_cores(cpu_max) == affinity
    assert _usable_cores(tmp_path / "absent") == affinity


def test_workers_share_the_cores():
    """Under xdist each worker runs OMP_NUM_THREADS intra-op threads: its share of the
    cores, or the count the user set."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) <= 1:
        pytest.skip("not under pytest-xdist")
    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])
