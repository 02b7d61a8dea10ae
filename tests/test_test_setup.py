"""The test setup itself (conftest.py): how the pytest-xdist workers share the cores, and
the interpreter's discarded work that it skips (interpreter_skips.py)."""
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import _usable_cores

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


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


# ------------------------------------------------------------ the interpreter's skips

interpreting = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="the kernels run on a GPU, not in the interpreter")


def _kernel_results():
    """Forward and backward, training and eval, of float32 (channels_last) and float16
    (NCHW, over many programs and a merge) with a residual and an activation: every
    tensor the calls return or update."""
    import bnkernels
    import precision
    from helpers import kernels_only, make_input, random_params
    results = []
    for dtype, fmt, plan in ((torch.float32, "channels_last", "default_plan"),
                             (torch.float16, "contiguous", "many_programs")):
        x = make_input((4, 6, 5, 7), dtype, "cpu", fmt).requires_grad_(True)
        r = make_input((4, 6, 5, 7), dtype, "cpu", fmt, seed=2).requires_grad_(True)
        w, b, rm, rv = random_params(6, torch.float32, "cpu")
        w.requires_grad_(True)
        with kernels_only(), precision.plan_context(plan):
            for training in (True, False):
                y = bnkernels.batch_norm(x, rm, rv, w, b, training, activation="silu",
                                         residual=r)
                grads = torch.autograd.grad((y * y).sum(), (x, r, w))
                results += [y, *grads, rm.clone(), rv.clone()]
    return results


@interpreting
def test_the_interpreter_skips_are_in_force():
    import conftest
    assert conftest.INTERPRETER_SKIPS == (True, True)


@interpreting
def test_the_interpreter_skips_change_no_result(monkeypatch):
    """The same bits with the interpreter's discarded work done as without, and the
    language patched once or twice per launch with the skip, not at each helper's call."""
    from triton.runtime import interpreter
    patches, launches = [], []
    counted = interpreter._patch_lang.__wrapped__
    monkeypatch.setattr(interpreter._patch_lang, "__wrapped__",
                        lambda fn: patches.append(fn) or counted(fn))
    launch = interpreter.GridExecutor.__call__
    monkeypatch.setattr(interpreter.GridExecutor, "__call__",
                        lambda self, *a, **k: launches.append(self) or launch(self, *a, **k))
    skipped = _kernel_results()
    # at most twice a launch: its own, and the first of triton.language's own helpers
    assert launches and len(launches) <= len(patches) <= 2 * len(launches)
    monkeypatch.undo()
    # the interpreter as triton ships it
    monkeypatch.setattr(interpreter, "_patch_lang", interpreter._patch_lang.__wrapped__)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__",
                        interpreter.GridExecutor.__call__.__wrapped__)
    monkeypatch.delattr(interpreter.interpreter_semantic, "binary_op_sanitize_overflow_impl")
    shipped = _kernel_results()
    assert len(shipped) == len(skipped)
    for ours, theirs in zip(skipped, shipped):
        assert torch.equal(ours, theirs)


@interpreting
def test_the_overflow_check_runs_where_its_assert_would(monkeypatch):
    """With debug on, an int32 add that overflows still fails; with it off (the
    interpreter's default), it wraps, as the interpreter shipped does."""
    import dataclasses
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    @triton.jit
    def add(out_ptr, a, b):
        tl.store(out_ptr, a + b)

    out = torch.zeros(1, dtype=torch.int32)
    add[(1,)](out, 2**31 - 1, 1)
    assert out.item() == -2**31
    builder = interpreter.interpreter_builder
    monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, debug=True))
    with pytest.raises(Exception, match="int32 overflow detected for operation add"):
        add[(1,)](out, 2**31 - 1, 1)
