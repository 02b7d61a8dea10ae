"""torch.compile sees one op per pass (no graph break), and the ops pass torch's opcheck."""
import pytest
import torch
from torch import nn
from torch.library import opcheck

import bnkernels
from helpers import kernels_only, make_input

COMPILE_BACKEND = "inductor" if torch.cuda.is_available() else "aot_eager"


def _net(device, momentum=0.1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), bnkernels.BatchNorm2d(8, momentum=momentum),
                         nn.ReLU(), nn.Conv2d(8, 4, 1), bnkernels.BatchNorm2d(4),
                         nn.Flatten(), nn.Linear(4 * 36, 6), bnkernels.BatchNorm1d(6)).to(device)


@pytest.mark.parametrize("channels_last,momentum", [(False, 0.1), (True, None)])
def test_compiled_equals_eager(channels_last, momentum, device):
    eager, compiled_net = _net(device, momentum), _net(device, momentum)
    compiled = torch.compile(compiled_net, fullgraph=True, backend=COMPILE_BACKEND)
    for step in range(2):
        x = make_input((4, 3, 6, 6), torch.float32, device,
                       "channels_last" if channels_last else "contiguous", loc=step, seed=step)
        outs = []
        for net in (eager, compiled):
            with kernels_only():
                y = net(x)
                y.square().sum().backward()
            outs.append(y)
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled_net.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), b in zip(eager.named_buffers(), compiled_net.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    eager.eval(), compiled_net.eval()
    x = make_input((2, 3, 6, 6), torch.float32, device, seed=9)
    with kernels_only():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


def test_functional_compiles_fullgraph(device):
    def f(x, rm, rv, w, b):
        return bnkernels.batch_norm(x, rm, rv, w, b, training=True, momentum=0.2).relu()

    compiled = torch.compile(f, fullgraph=True, backend=COMPILE_BACKEND)
    x = make_input((3, 4, 5), torch.float32, device, loc=1.0)
    args = [torch.zeros(4, device=device), torch.ones(4, device=device),
            torch.rand(4, device=device), torch.randn(4, device=device)]
    args2 = [a.clone() for a in args]
    with kernels_only():
        torch.testing.assert_close(compiled(x, *args2), f(x, *args))
    for a, b in zip(args, args2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_opcheck(training, affine, device):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch."""
    x = make_input((3, 4, 5, 2), torch.float32, device, "channels_last").requires_grad_(True)
    w = torch.rand(4, device=device, requires_grad=True) if affine else None
    b = torch.randn(4, device=device, requires_grad=True) if affine else None
    rm, rv = torch.randn(4, device=device), torch.rand(4, device=device) + 0.5
    with kernels_only():
        args = (x, w, b, rm, rv, training, 1e-5, None, None)
        opcheck(torch.ops.bnkernels.batch_norm_fwd.default, args)
        y, mean, rstd, _ = torch.ops.bnkernels.batch_norm_fwd(*args)
        stats = (mean, rstd, None) if training else (rm, None, rv)
        # Inputs without grad: the backward op has no derivative of its own (no double
        # backward), which opcheck would otherwise try.
        w = None if w is None else w.detach()
        opcheck(torch.ops.bnkernels.batch_norm_bwd.default,
                (torch.randn_like(y), x.detach(), w, None, None, None, *stats, 1e-5, None,
                 True, True, False))
