"""fold_conv_bn: every foldable case folds and gives the unfolded model's outputs; every
unsafe case is left alone, with its reason."""
import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bnkernels
from bnkernels.fold import FoldedBatchNorm
from bnkernels.fold_math import fold_bn_into_weights
from helpers import assert_onnx_export_matches, make_bn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import resnet  # noqa: E402


def randomize_bn(model, seed=0):
    """Random statistics and affine parameters: never the defaults of mean 0, var 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                    m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.2)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.num_features, generator=gen))
    return model


def count_bn(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def check_fold(model, x, expect_left, atol=1e-5):
    model = randomize_bn(model).eval()
    before = copy.deepcopy(model.state_dict())
    folded, report = bnkernels.fold_conv_bn(model, return_report=True)
    assert count_bn(folded) == expect_left, str(report)
    assert len(report.left) == expect_left
    for k, v in model.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k])
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=atol)
    return folded, report


LAYERS = [
    (nn.Conv1d(4, 6, 3, padding=1), nn.BatchNorm1d(6), (2, 4, 9)),
    (nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, bias=False), nn.BatchNorm2d(6), (2, 4, 9, 9)),
    (nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6), (2, 6, 7, 7)),  # depthwise
    (nn.Conv2d(4, 6, 1, groups=2), nn.BatchNorm2d(6, affine=False), (2, 4, 5, 5)),
    (nn.Conv3d(4, 6, 2, bias=False), nn.BatchNorm3d(6), (2, 4, 4, 4, 4)),
    (nn.ConvTranspose1d(4, 6, 3, stride=2), nn.BatchNorm1d(6), (2, 4, 5)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, bias=False), nn.BatchNorm2d(6), (2, 4, 5, 5)),
    (nn.ConvTranspose2d(6, 9, 3, groups=3, dilation=2), nn.BatchNorm2d(9), (2, 6, 5, 5)),
    (nn.ConvTranspose3d(4, 6, 2, groups=2), nn.BatchNorm3d(6, affine=False), (2, 4, 3, 3, 3)),
    (nn.Linear(5, 6), nn.BatchNorm1d(6), (4, 5)),
    (nn.Linear(5, 6, bias=False), nn.BatchNorm1d(6, affine=False), (4, 5)),
    (nn.Conv2d(4, 6, 3), bnkernels.BatchNorm2d(6), (2, 4, 6, 6)),
    (nn.Conv2d(4, 6, 3), make_bn(nn.BatchNorm2d, 6, bias=False), (2, 4, 6, 6)),
]


@pytest.mark.parametrize("layer,bn,shape", LAYERS, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None)
def test_every_layer_type_folds(layer, bn, shape):
    torch.manual_seed(0)
    folded, report = check_fold(nn.Sequential(layer, bn, nn.ReLU()), torch.randn(shape), 0)
    assert report.folded == [("0", "1")]
    assert isinstance(folded[1], FoldedBatchNorm)


def test_fold_math_against_the_two_modules():
    """The pure function alone: ConvTranspose with groups along the right axis."""
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(6, 8, 3, groups=2).double()
    bn = randomize_bn(nn.BatchNorm2d(8).double()).eval()
    w, b = fold_bn_into_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                bn.eps, bn.weight, bn.bias, transposed=True, groups=2)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    expected = bn(conv(x))
    got = nn.functional.conv_transpose2d(x, w, b, groups=2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


class TwiceCalled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class OutputUsedTwice(TwiceCalled):
    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class BnCalledTwice(TwiceCalled):
    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn(x)


class WeightTied(TwiceCalled):
    def forward(self, x):
        return self.bn(self.conv(x)) * self.conv.weight.sum()


class NotALayer(TwiceCalled):
    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))


@pytest.mark.parametrize("cls,reason", [
    (TwiceCalled, "called more than once"), (OutputUsedTwice, "also feeds something else"),
    (BnCalledTwice, "called more than once"), (WeightTied, "read elsewhere"),
    (NotALayer, "not the output of a module")])
def test_unsafe_cases_are_left(cls, reason):
    folded, report = check_fold(cls(), torch.randn(2, 3, 4, 4), 1)
    assert reason in report.left[0][1]
    assert isinstance(folded.bn, bnkernels.BatchNorm2d)  # the BN left runs bnkernels' kernel


def test_shared_module_and_no_running_stats_are_left():
    conv = nn.Conv2d(3, 3, 1)
    shared = nn.Sequential(conv, nn.BatchNorm2d(3), conv, nn.BatchNorm2d(3))
    _, report = check_fold(shared, torch.randn(2, 3, 4, 4), 2)
    assert all("called more than once" in r or "shared" in r for _, r in report.left)
    no_stats = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False))
    _, report = check_fold(no_stats, torch.randn(2, 3, 4, 4), 1)
    assert "track_running_stats=False" in report.left[0][1]


class DataDependent(nn.Module):
    """Does not trace: folding happens inside its traceable parts and Sequentials."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.block = resnet.Bottleneck(4, 2)
        self.head_conv = nn.Conv2d(8, 8, 1)
        self.head_bn = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.block(self.seq(x))
        if x.sum() > 0:  # data-dependent: fx cannot trace this
            x = x * 2
        return self.head_bn(self.head_conv(x))


def test_untraceable_model_folds_inside_its_parts():
    torch.manual_seed(0)
    folded, report = check_fold(DataDependent(), torch.randn(2, 3, 8, 8), 1)
    assert [bn for bn, _ in report.left] == ["head_bn"]
    assert ("seq.0", "seq.1") in report.folded and ("block.conv3", "block.bn3") in report.folded


def test_resnet_folds_completely():
    torch.manual_seed(0)
    model = resnet.tiny_resnet()
    folded, report = check_fold(model, torch.randn(2, 3, 32, 32), 0, atol=1e-4)
    assert ("layer2.0.downsample.0", "layer2.0.downsample.1") in report.folded
    assert type(folded) is type(model)


def test_bnkernels_model_folds_and_training_model_is_copied():
    model = bnkernels.convert_batchnorm(randomize_bn(resnet.tiny_resnet()))
    assert model.training
    folded = bnkernels.fold_conv_bn(model)
    assert model.training and count_bn(model) > 0  # the input stays as it was
    assert not folded.training and count_bn(folded) == 0
    with pytest.raises(ValueError, match="eval mode"):
        bnkernels.fold_conv_bn(model, inplace=True)
    model.eval()
    same = bnkernels.fold_conv_bn(model, inplace=True)
    assert same is model and count_bn(model) == 0


def test_requires_grad_is_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)).eval()
    model[0].weight.requires_grad_(False)
    folded = bnkernels.fold_conv_bn(model)
    assert not folded[0].weight.requires_grad and not folded[0].bias.requires_grad


def test_linear_fold_refuses_an_input_it_does_not_hold_for():
    model = randomize_bn(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))).eval()
    folded = bnkernels.fold_conv_bn(model)
    x3 = torch.randn(2, 4, 4)  # BN1d normalizes dim 1 here, not the Linear's features
    model(x3)
    with pytest.raises(RuntimeError, match="fold does not hold"):
        folded(x3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_fold_is_accurate(dtype):
    """Folded in float32 and cast once: no further from float64 than about twice the
    unfolded half model."""
    torch.manual_seed(0)
    model64 = randomize_bn(resnet.tiny_resnet()).eval().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        truth = model64(x)
        half = copy.deepcopy(model64).to(dtype)
        err_unfolded = (half(x.to(dtype)).double() - truth).abs().max().item()
        err_folded = (bnkernels.fold_conv_bn(half)(x.to(dtype)).double() - truth).abs().max().item()
    assert err_folded <= 2.5 * err_unfolded, (err_folded, err_unfolded)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo_exporter", "torchscript_exporter"])
def test_onnx_export_has_no_batchnorm(dynamo, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = randomize_bn(resnet.tiny_resnet()).eval()
    folded = bnkernels.fold_conv_bn(model)
    assert_onnx_export_matches(folded, model, torch.randn(2, 3, 32, 32),
                               tmp_path / "folded.onnx", dynamo)


class ReachesIntoItsSequential(DataDependent):
    """Does not trace, and calls a conv of its Sequential directly too: folding seq.0 would
    change that direct call's result."""

    def forward(self, x):
        x = self.seq(x) + self.seq[0](x)
        if x.sum() > 0:
            x = x * 2
        return self.head_bn(self.head_conv(x))


def test_untraceable_parent_that_reaches_into_a_child_leaves_it():
    torch.manual_seed(0)
    model = ReachesIntoItsSequential().eval()
    model.block = nn.Identity()
    model.head_conv = nn.Conv2d(4, 8, 1)
    folded, report = check_fold(model, torch.randn(2, 3, 8, 8), 2)
    reasons = dict(report.left)
    assert "reaches into seq" in reasons["seq.1"]


@pytest.mark.parametrize("where", ["conv", "bn"])
@pytest.mark.parametrize("kind", ["forward", "forward_pre", "backward"])
def test_layers_with_hooks_are_left(where, kind):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    seen = []
    module = model[0] if where == "conv" else model[1]
    if kind == "forward":
        module.register_forward_hook(lambda m, i, o: seen.append(o.sum()))
    elif kind == "forward_pre":
        module.register_forward_pre_hook(lambda m, i: seen.append(i[0].sum()))
    else:
        module.register_full_backward_hook(lambda m, gi, go: None)
    folded, report = check_fold(model, torch.randn(2, 3, 6, 6), 1)
    assert "hooks" in report.left[0][1]


def test_global_hooks_leave_every_pair():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        _, report = check_fold(model, torch.randn(2, 3, 6, 6), 1)
    finally:
        handle.remove()
    assert "hooks" in report.left[0][1]


def test_a_fused_model_folds_with_its_activations():
    """convert_batchnorm(fuse=True) then fold_conv_bn: a folded BatchNormAct keeps its
    activation (the fold once dropped it), and the model computes what it did."""
    torch.manual_seed(0)
    model = randomize_bn(resnet.tiny_resnet()).eval()
    fused = bnkernels.convert_batchnorm(model, fuse=True).eval()
    folded, report = bnkernels.fold_conv_bn(fused, return_report=True)
    assert report.folded
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
