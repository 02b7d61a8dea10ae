"""What only a GPU can show: no host synchronisation, CUDA-graph capture (which also shows
the kernels go on torch's current stream: capture runs on a side stream), and tensors past
2**31 elements. Skipped without CUDA."""
import pytest
import torch

import bnkernels
from helpers import kernels_only

# Each on both kernel backends: Triton and the CUDA C++ of csrc/.
pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("kernel_backend")]


def _step(bn, x, g):
    y = bn(x)
    y.backward(g)
    return y


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("training", [True, False])
def test_no_host_sync(momentum, training):
    bn = bnkernels.BatchNorm2d(64, momentum=momentum).cuda().train(training)
    x = torch.randn(8, 64, 14, 14, device="cuda", requires_grad=True)
    g = torch.randn_like(x)
    _step(bn, x, g)  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with kernels_only():
            _step(bn, x, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_capture_matches_eager():
    torch.manual_seed(0)
    bn = bnkernels.BatchNorm2d(32, momentum=None).cuda()
    ref = bnkernels.BatchNorm2d(32, momentum=None).cuda()
    ref.load_state_dict(bn.state_dict())
    x = torch.randn(16, 32, 28, 28, device="cuda", requires_grad=True)
    g = torch.randn_like(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _step(bn, x, g)  # warm-up on a side stream, as torch's CUDA-graph docs do
        _step(ref, x.detach().requires_grad_(True), g)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    bn.weight.grad = bn.bias.grad = None
    with torch.cuda.graph(graph):
        y = _step(bn, x, g)
    for _ in range(3):
        graph.replay()
    xr = x.detach().clone().requires_grad_(True)
    for _ in range(3):
        ref.weight.grad = ref.bias.grad = None
        xr.grad = None
        yr = _step(ref, xr, g)
    torch.cuda.synchronize()
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item()


def test_more_than_2_to_31_elements():
    n, c, hw = 33, 64, 1024 * 1024  # 2.2e9 elements of float16, 4.4 GB
    x = torch.randn(n, c, hw, device="cuda", dtype=torch.float16)
    x[:, :2] += 5.0
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    with kernels_only():
        y = bnkernels.batch_norm(x, rm, rv, training=True, momentum=1.0)
    for ch in (0, 1, c - 1):  # first, and last (the largest offsets)
        xc = x[:, ch].double()
        mean, var = xc.mean(), xc.var(unbiased=False)
        torch.testing.assert_close(rm[ch].double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rv[ch].double(), xc.var(), rtol=1e-4, atol=1e-5)
        expected = ((xc - mean) / (var + 1e-5).sqrt()).half()
        torch.testing.assert_close(y[:, ch], expected, rtol=4e-3, atol=4e-3)


def _converted_resnet50():
    """torchvision's ResNet-50 with every BatchNorm2d converted, on the GPU."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import models
    tv = models.import_torchvision()
    if tv is None:
        pytest.skip("torchvision is not installed")
    torch.manual_seed(0)
    return bnkernels.convert_batchnorm(tv.models.resnet50()).cuda()


def _bn_state(model):
    return [t.clone() for m in model.modules() if isinstance(m, bnkernels.BatchNorm2d)
            for t in (m.running_mean, m.running_var, m.num_batches_tracked)]


def test_converted_resnet50_training_step_captured_in_a_cuda_graph():
    """Manual capture (torch.cuda.graph) of a whole training step of a converted ResNet-50,
    replayed, equals the same steps run eagerly: outputs, gradients, every BN's buffers.
    The eager replays of eager.py run inside the capture too (warm-up records them)."""
    import copy
    model = _converted_resnet50()
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 64, 64, device="cuda")

    def step(m):
        for p in m.parameters():
            p.grad = None
        out = m(x)
        out.float().square().mean().backward()
        return out

    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                step(model)
                step(ref)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        for p in model.parameters():
            p.grad = None
        with torch.cuda.graph(graph):
            out = model(x)
            out.float().square().mean().backward()
        for _ in range(2):
            graph.replay()
            expected = step(ref)
        torch.cuda.synchronize()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5)
    for a, b in zip(_bn_state(model), _bn_state(ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_converted_resnet50_under_torch_compile_reduce_overhead(training):
    """torch.compile(mode="reduce-overhead") (inductor, CUDA graphs) of a converted
    ResNet-50 equals eager, in eval and in a training step."""
    import copy
    torch._dynamo.reset()
    model = _converted_resnet50().train(training)
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, mode="reduce-overhead")
    x = torch.randn(4, 3, 64, 64, device="cuda")
    for _ in range(3):  # cudagraph trees record after their warm-up runs
        for m in (model, ref):
            for p in m.parameters():
                p.grad = None
        out = compiled(x)
        expected = ref(x)
        if training:
            out.float().square().mean().backward()
            expected.float().square().mean().backward()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)
    if training:
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-2, atol=1e-4)
    for a, b in zip(_bn_state(model), _bn_state(ref)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
