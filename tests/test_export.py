"""Recording a converted model for deployment. torch.jit.trace, torch.export and both ONNX
exporters record torch's own batch_norm (and the epilogue's add and activation) in place
of bnkernels' ops, so the graph runs where bnkernels is not installed and computes what
torch's modules compute, running statistics included; torch.jit.script is refused with a
clear error and leaves the model as it was. Eager calls before and after a recording run
bnkernels' kernels."""
import copy
import re
import warnings

import pytest
import torch
from torch import nn

import bnkernels
from helpers import (BN_CLASSES, bn_pair, kernels_only, make_input, onnx_export_and_run,
                     randomize_norms)


class _Block(nn.Module):
    """conv → BN → relu → conv → BN → add → relu: fuse=True makes a BN+ReLU and a
    BN+add+ReLU of it."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


def _block():
    torch.manual_seed(0)
    return randomize_norms(_Block())


def _fused(model):
    fused = bnkernels.convert_batchnorm(copy.deepcopy(model), fuse=True)
    assert {type(m).__name__ for m in fused.modules()} >= {"BatchNormAct2d"}
    return fused


def _assert_same_state(ours, ref):
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def _trace_kinds(traced):
    return {node.kind() for node in traced.inlined_graph.nodes()}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dim", sorted(BN_CLASSES))
def test_trace_records_torch_batch_norm(device, dim, training):
    ref, ours = bn_pair(dim, 3, torch.float32, device)
    ref.train(training), ours.train(training)
    shape = (4, 3, 5, 6, 7)[:dim]
    x, x2 = (make_input(shape, torch.float32, device, seed=s) for s in (0, 1))
    with kernels_only():
        ours(x)  # a call of the signature first: a replay recorded for it must not be taken
    ref(x)
    traced = torch.jit.trace(ours, x2, check_trace=False)  # a training call moves the stats
    ref(x2)
    kinds = _trace_kinds(traced)
    assert "aten::batch_norm" in kinds and not any("bnkernels" in k for k in kinds)
    torch.testing.assert_close(traced(x), ref(x))
    _assert_same_state(ours, ref)
    with kernels_only():  # and the module itself is bnkernels' still
        y = ours(x2)
    torch.testing.assert_close(y, ref(x2))


@pytest.mark.parametrize("record", ["trace", "export"])
def test_recording_raises_torchs_errors_first(device, record):
    """bnkernels' checks run before the torch ops are recorded: a wrong channel count raises
    what torch's module raises, and nothing is written."""
    ref, ours = bn_pair(4, 4, torch.float32, device)
    ref.train(), ours.train()
    x = make_input((2, 3, 5, 5), torch.float32, device)
    with pytest.raises(RuntimeError) as theirs:
        ref(x)
    before = {name: t.clone() for name, t in ours.state_dict().items()}
    with pytest.raises(RuntimeError, match=f"^{re.escape(str(theirs.value))}$"):
        if record == "trace":
            torch.jit.trace(ours, x, check_trace=False)
        else:
            torch.export.export(ours, (x,))
    for name, t in ours.state_dict().items():
        torch.testing.assert_close(t, before[name], rtol=0, atol=0, msg=name)


def test_trace_of_the_functional_form_and_its_epilogue(device):
    x, res = (make_input((4, 3, 5, 5), torch.float32, device, seed=s) for s in (0, 1))
    stats = [torch.randn(3, device=device), torch.rand(3, device=device) + 0.5]
    weight, bias = torch.rand(3, device=device) + 0.5, torch.randn(3, device=device)

    def fn(x, res, mean, var):
        return bnkernels.batch_norm(x, mean, var, weight, bias, training=True,
                                    activation="silu", residual=res)

    theirs = [s.clone() for s in stats]
    traced = torch.jit.trace(fn, (x, res, *[s.clone() for s in stats]), check_trace=False)
    kinds = _trace_kinds(traced)
    assert {"aten::batch_norm", "aten::silu"} <= kinds
    assert not any("bnkernels" in k for k in kinds)
    expected = nn.functional.silu(nn.functional.batch_norm(x, *theirs, weight, bias, True) + res)
    torch.testing.assert_close(traced(x, res, *stats), expected)
    for a, b in zip(stats, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_export_records_torch_batch_norm(device, training, strict):
    """torch.export of a fused model: aten's batch_norm, relu and add, no bnkernels op; the
    exported program's outputs and buffer updates are the torch model's."""
    if strict and training:
        pytest.skip("strict export traces the same forward through dynamo: eval covers it")
    ref = _block().to(device).train(training)
    fused = _fused(ref).train(training)
    x = make_input((2, 4, 6, 6), torch.float32, device)
    program = torch.export.export(copy.deepcopy(fused), (x,), strict=strict)
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert any("batch_norm" in t for t in targets) and not any("bnkernels" in t for t in targets)
    exported = program.module()
    ref = copy.deepcopy(ref)
    for seed in (1, 2):  # twice: the second call sees the first's running statistics
        x = make_input((2, 4, 6, 6), torch.float32, device, seed=seed)
        torch.testing.assert_close(exported(x), ref(x))
    if training:
        buffers = dict(exported.named_buffers())
        for name, value in ref.named_buffers():
            torch.testing.assert_close(buffers[name], value, msg=name)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_of_a_converted_model(dynamo, tmp_path):
    """A converted (not folded) model exports to ONNX and runs in onnxruntime."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    ref = _block().eval()
    fused = _fused(ref).eval()
    x = torch.randn(2, 4, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and advice warnings
        _, out = onnx_export_and_run(fused, x, tmp_path / "converted.onnx", dynamo)
    with torch.no_grad():
        torch.testing.assert_close(out, ref(x), rtol=1e-4, atol=1e-4)


def test_script_is_refused_clearly(device):
    model = bnkernels.convert_batchnorm(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
    model.to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(RuntimeError, match="torch.jit.script can't compile bnkernels' "
                                               "BatchNorm2d.*torch.jit.trace or torch.export"):
            torch.jit.script(model)
    assert type(model[1]) is bnkernels.BatchNorm2d  # left as it was
    with kernels_only():
        model(torch.randn(2, 3, 4, 4, device=device))
