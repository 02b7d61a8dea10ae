"""bnkernels.SyncBatchNorm over 2 gloo processes (CPU, a file store: no network) against one
nn.BatchNorm2d on the concatenated batch; a DDP step; and the world-of-one behaviour."""
import os
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bnkernels

# Every test here runs on each kernel backend: Triton and the CUDA C++ of csrc/.
pytestmark = pytest.mark.usefixtures("kernel_backend")

WORLD = 2
TIMEOUT_S = 300


def _close(a, b, what, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=what)


def _passed(init_file, rank):
    """The marker a worker leaves once every one of its checks has passed."""
    return f"{init_file}.rank{rank}.passed"


def _finish(init_file, rank):
    # A barrier first: no collective is in flight when the group is torn down.
    dist.barrier()
    open(_passed(init_file, rank), "w").close()


def _sync_worker(rank, init_file, shards, layout, momentum):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        gen = torch.Generator().manual_seed(0)
        ref = nn.BatchNorm2d(4, momentum=momentum)
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5, generator=gen), ref.bias.uniform_(-1, 1, generator=gen)
        ours = bnkernels.SyncBatchNorm(4, momentum=momentum)
        ours.load_state_dict(ref.state_dict())
        start, stop = sum(shards[:rank]), sum(shards[:rank + 1])
        for step in range(3):
            x = torch.randn(sum(shards), 4, 5, 3, generator=gen, dtype=torch.float64).float()
            x = x * (step + 1) + 10 * step
            g = torch.randn(x.shape, generator=gen)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            xr = x.clone().requires_grad_(True)
            yr = ref(xr)
            yr.backward(g)
            xl = x[start:stop].clone().requires_grad_(True)
            yl = ours(xl)
            yl.backward(g[start:stop])
            _close(yl, yr[start:stop], f"rank {rank} step {step}: output")
            _close(xl.grad, xr.grad[start:stop], f"rank {rank} step {step}: input grad")
            for p_ours, p_ref, name in ((ours.weight, ref.weight, "weight"),
                                        (ours.bias, ref.bias, "bias")):
                grad = p_ours.grad.clone()
                dist.all_reduce(grad)
                _close(grad, p_ref.grad, f"rank {rank} step {step}: all-reduced {name} grad", 1e-4)
                p_ours.grad = p_ref.grad = None
            for name, buf in ref.named_buffers():
                _close(getattr(ours, name), buf, f"rank {rank} step {step}: {name}")
        _finish(init_file, rank)
    finally:
        dist.destroy_process_group()


def _ddp_worker(rank, init_file, shards):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        torch.manual_seed(0)
        ref = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        model = bnkernels.SyncBatchNorm.convert_sync_batchnorm(
            nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()))
        model.load_state_dict(ref.state_dict())
        assert isinstance(model[1], bnkernels.SyncBatchNorm)
        # DDP refuses any nn.SyncBatchNorm subclass in a CPU module (a guard for torch's own,
        # CUDA-only implementation); ours runs on CPU with gloo, so the guard is lifted here.
        nn.parallel.DistributedDataParallel._passing_sync_batchnorm_handle = lambda self, m: None
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1 / WORLD)  # DDP averages the grads
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(sum(shards), 3, 4, 4, generator=gen) + 2
        w = torch.randn(sum(shards), 4, 4, 4, generator=gen)
        start, stop = sum(shards[:rank]), sum(shards[:rank + 1])
        (ddp(x[start:stop]) * w[start:stop]).sum().backward()
        opt.step()
        (ref(x) * w).sum().backward()
        ref_opt.step()
        for (name, a), b in zip(model.named_parameters(), ref.parameters()):
            _close(a, b, f"rank {rank}: {name} after a DDP step")
        _close(model[1].running_var, ref[1].running_var, f"rank {rank}: running_var")
        _finish(init_file, rank)
    finally:
        dist.destroy_process_group()


def _run(fn, *args, tmp_path):
    init_file = str(tmp_path / "store")
    ctx = mp.start_processes(fn, args=(init_file, *args), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"the {WORLD} processes did not finish in {TIMEOUT_S} s")
    except mp.ProcessExitedException as exc:
        # A worker killed by a signal after it passed every check died in torch's own
        # process-group teardown (gloo's threads at exit, seen once on CI as SIGABRT with
        # "terminate called without an active exception"), not in anything tested here.
        # An exception raised by a check exits with code 1 and is re-raised, as is any
        # signal before every rank's checks have passed.
        passed = all(os.path.exists(_passed(init_file, r)) for r in range(WORLD))
        if exc.signal_name is None or not passed:
            raise
        warnings.warn(f"every rank passed; then {exc}")


@pytest.mark.parametrize("shards,layout,momentum", [
    ((3, 5), "contiguous", 0.1),      # uneven
    ((0, 4), "channels_last", None),  # a rank with an empty batch; cumulative average
])
def test_sync_matches_one_batchnorm_on_the_whole_batch(shards, layout, momentum, tmp_path):
    _run(_sync_worker, shards, layout, momentum, tmp_path=tmp_path)


def test_ddp_step(tmp_path):
    _run(_ddp_worker, (2, 3), tmp_path=tmp_path)


def test_merge_partials_is_exact():
    from bnkernels.sync_batch_norm import merge_partials

    x = torch.randn(4, 30, dtype=torch.float64) * 3 + 1e4
    parts, bounds = [], [0, 7, 7, 30]  # includes an empty part
    for a, b in zip(bounds, bounds[1:]):
        chunk = x[:, a:b]
        n = torch.full((4,), float(b - a), dtype=torch.float64)
        mean = chunk.mean(1) if b > a else torch.zeros(4, dtype=torch.float64)
        m2 = ((chunk - mean[:, None]) ** 2).sum(1)
        parts.append((n, mean, m2))
    count, mean, var = merge_partials(parts)
    torch.testing.assert_close(count, torch.full((4,), 30.0, dtype=torch.float64))
    torch.testing.assert_close(mean, x.mean(1), rtol=1e-14, atol=0)
    torch.testing.assert_close(var, x.var(1, unbiased=False), rtol=1e-10, atol=0)


def test_without_a_process_group_it_is_a_plain_batchnorm(device):
    ref = nn.BatchNorm2d(3).to(device)
    ours = bnkernels.SyncBatchNorm(3).to(device)
    assert isinstance(ours, nn.SyncBatchNorm)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(4, 3, 5, 5, device=device) + 1
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var)
