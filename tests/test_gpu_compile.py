"""The Triton kernels compiled for real GPUs (sm_80, sm_90), on a machine without one.

The interpreter runs the kernels' Python, not what the GPU compiler makes of it: a kernel
that interprets fine can still fail to compile (an op with no lowering, a type the
backend refuses). Here every kernel variant a set of calls launches — recorded with the
GPU's tile sizes — goes through triton.compile down to a cubin, for both architectures,
in a subprocess without TRITON_INTERPRET (the kernels must be real JIT functions there),
specialised by Triton's own binder from the recorded arguments (pointer alignment, integers
divisible by 16 or equal to 1), so that what compiles is what a GPU launch compiles.
It needs no GPU: only triton's bundled compiler (ptxas).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bnkernels
from bnkernels.backends.triton import launch as triton_launch
from bnkernels.backends.triton import plan as triton_plan
from helpers import make_input, random_params

pytest.importorskip("triton.backends.nvidia")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import static_check  # noqa: E402

# The worker specialises each variant as JITFunction.run would, through static_check's use
# of triton's binder (triton 3.9's internals): elsewhere, the GPU runs the real thing.
pytestmark = pytest.mark.skipif(not static_check.binder_available(),
                                reason="the worker drives triton 3.9's binder")

_LAUNCH_OPTIONS = ("num_warps", "num_stages")
WORKER = Path(__file__).with_name("gpu_compile_worker.py")


def _signature(kernel, args, meta):
    """A launch as the worker rebuilds it: each argument (a tensor as its dtype and whether
    it is 16-byte aligned, a scalar as its value: Triton specialises on both), the
    constexprs and the warps. The worker specialises it with Triton's own binder, as a
    GPU launch would be (bench/static_check.py)."""
    described = []
    for name, value in zip(kernel.arg_names, args):
        if isinstance(value, torch.Tensor):
            described.append({"dtype": str(value.dtype).replace("torch.", ""),
                              "aligned": value.data_ptr() % 16 == 0})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            described.append(value)
        else:
            raise TypeError(f"{name}: {value!r}")
    constexprs = {k: str(v) if not isinstance(v, (bool, int)) else v
                  for k, v in meta.items() if k not in _LAUNCH_OPTIONS}
    return {"kernel": kernel.fn.__name__, "args": described, "constexprs": constexprs,
            "num_warps": meta.get("num_warps", 4)}


def _record_variants(monkeypatch):
    """Every distinct kernel variant a set of calls launches (signature, constexprs, warps)."""
    variants = {}

    def record(kernel, grid, *args, **meta):
        variant = _signature(kernel, args, meta)
        variants[json.dumps(variant, sort_keys=True)] = variant
        real_launch(kernel, grid, *args, **meta)

    real_launch = triton_launch._launch
    monkeypatch.setattr(triton_launch, "_launch", record)
    monkeypatch.setattr(triton_plan, "INTERPRETER_TILE", triton_plan.GPU_TILE)  # the GPU's tiles

    device = "cpu"
    epilogues = [(None, False), ("relu", True), ("silu", False), ("gelu", True)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for fmt in ("contiguous", "channels_last"):
            x = make_input((4, 6, 5, 7), dtype, device, fmt).requires_grad_(True)
            r = make_input((4, 6, 5, 7), dtype, device, fmt, seed=2).requires_grad_(True)
            w, b, rm, rv = random_params(6, torch.float64 if dtype == torch.float64
                                         else torch.float32, device)
            w.requires_grad_(True)
            for training in (True, False):
                # every epilogue in float32; the other dtypes: none, and the richest
                for activation, with_res in epilogues if dtype == torch.float32 else \
                        epilogues[::3]:
                    y = bnkernels.batch_norm(x, rm, rv, w, b, training, activation=activation,
                                             residual=r if with_res else None)
                    y.sum().backward()
    # channels over several programs (the merge kernel), and a module's step: the running
    # statistics updated by the kernels with a momentum and as a cumulative average
    for fmt in ("contiguous", "channels_last"):
        for shape in ((8, 6, 32, 32), (4, 6, 5, 7)):
            x = make_input(shape, torch.float32, device, fmt).requires_grad_(True)
            for momentum in (0.1, None):
                bnkernels.BatchNorm2d(6, momentum=momentum)(x).sum().backward()
    # per-channel tensors as strided and expanded views (their strides are not 1)
    x = make_input((4, 6, 5, 7), torch.float32, device).requires_grad_(True)
    w, _, rm, rv = (torch.stack([t, t], 1)[:, 0] for t in random_params(6, torch.float32,
                                                                        device))
    for training in (True, False):
        y = bnkernels.batch_norm(x, rm, rv, w, torch.ones(1).expand(6), training)
        y.sum().backward()
    # SyncBatchNorm's pieces: global statistics in, the input gradient out
    x = make_input((4, 6, 9), torch.float32, device)
    mean, var = torch.ops.bnkernels.batch_norm_stats(x)
    count = torch.full_like(mean, 4 * 9)
    torch.ops.bnkernels.batch_norm_input_grad(x, x, None, mean, var, mean, var, count, 1e-5)
    return list(variants.values())


@pytest.fixture(scope="module")
def variants():
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _record_variants(monkeypatch)


@pytest.mark.parametrize("arch", [80, 90])
def test_every_kernel_variant_compiles_for_the_gpu(variants, arch):
    assert {v["kernel"] for v in variants} == {"_reduce_kernel", "_merge_kernel",
                                               "_apply_kernel"}
    assert len(variants) > 20
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(WORKER.parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(WORKER), str(arch)], input=json.dumps(variants),
                          capture_output=True, text=True, env=env, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout)
    assert len(results) == len(variants)
    # every variant compiled to a cubin, with no register spills at the plan's tile sizes
    spilled = [r for r in results if r["spills"]]
    assert not spilled, spilled
    # compiled as specialised (16-byte aligned pointers, sizes divisible by 16), not as
    # the scalar-only code an unspecialised compile makes
    assert all(r["divisible"] > 0 for r in results)
    if os.environ.get("BNKERNELS_SHOW_REGISTERS"):
        for r in results:
            print(arch, r["kernel"], r["registers"], r["spills"], r["constexprs"])
