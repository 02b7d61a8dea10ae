"""torchvision's and timm's models through bnkernels: folded, converted, fused, trained,
exported. Small inputs on CPU (the Triton kernels through the interpreter); skipped where
torchvision or timm is not installed (requirements/cpu.txt installs both)."""
import copy
import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bnkernels
from bnkernels.fold import is_batchnorm
from bnkernels.replace import qualified_name
from helpers import TOL, assert_onnx_export_matches, kernels_only, randomize_norms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import models  # noqa: E402

tv = models.import_torchvision()
timm = models.import_timm()
needs_torchvision = pytest.mark.skipif(tv is None, reason="torchvision is not installed")
needs_timm = pytest.mark.skipif(timm is None, reason="timm is not installed")

FOLD_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
               "regnet_y_400mf", "shufflenet_v2_x0_5", "mnasnet0_5", "googlenet", "densenet121"]
# timm models built on BatchNormAct2d: SiLU (fused), ReLU (fused), Hardswish (not fused), ...
TIMM_MODELS = ["efficientnet_b0", "mobilenetv3_small_050", "lcnet_050", "regnety_002",
               "cspresnet50", "densenet121"]


def torchvision_model(name, **kwargs):
    if name == "googlenet":
        kwargs.update(aux_logits=False, init_weights=False)
    torch.manual_seed(0)
    return getattr(tv.models, name)(**kwargs)


def _count(model, predicate):
    return sum(1 for m in model.modules() if predicate(m))


@needs_torchvision
@pytest.mark.parametrize("name", FOLD_MODELS)
def test_fold_torchvision(name):
    """Every BatchNorm that follows a layer alone folds (DenseNet's after a concatenation
    cannot), the folded model computes what the model did, and where all fold, no
    normalization is left to run."""
    model = randomize_norms(torchvision_model(name)).eval().double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    folded, report = bnkernels.fold_conv_bn(model, return_report=True)
    if name == "densenet121":
        assert len(report.folded) == 59  # norm0, and each dense layer's norm2
        assert {why for _, why in report.left} == {"its input is not the output of a module"}
    else:
        assert report.left == [] and report.folded
        assert _count(folded, is_batchnorm) == 0
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-9, atol=1e-9)


@needs_torchvision
def test_fold_frozen_batchnorm():
    """Detection backbones use torchvision's FrozenBatchNorm2d: folded like nn.BatchNorm2d."""
    frozen = tv.ops.misc.FrozenBatchNorm2d
    model = randomize_norms(torchvision_model("resnet50", norm_layer=frozen)).eval().double()
    folded, report = bnkernels.fold_conv_bn(model, return_report=True)
    assert len(report.folded) == 53 and report.left == []
    assert _count(folded, is_batchnorm) == 0
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-9, atol=1e-9)


@needs_torchvision
def test_fuse_torchvision_resnet50():
    """BN -> ReLU and BN -> add -> ReLU: every BN but the 4 downsample ones (the first
    operand of each block's add, bn3, takes it)."""
    model = torchvision_model("resnet50")
    fused, report = bnkernels.convert_batchnorm(model, fuse=True, return_report=True)
    assert len(report.fused) >= 45 and len(report.fused) == 49, report
    assert len(report.converted) == 53 and report.left == []
    assert {what for _, what in report.fused} == {"relu", "add + relu"}
    assert _count(fused, lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm)
                  and not isinstance(m, (bnkernels.BatchNorm2d, bnkernels.BatchNormAct2d))) == 0


def _train(model, x, target, steps=2, lr=0.01):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = model(x)
    return out, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _judged_against_float64(ours, torch32, torch64, name):
    """ours no further from the float64 run than torch's float32 run is (with slack for
    rounding that training amplifies), and close to it in absolute terms."""
    scale = max(1.0, torch64.abs().max().item())
    err_ours = (ours.double() - torch64).abs().max().item()
    err_torch = (torch32.double() - torch64).abs().max().item()
    assert err_ours <= 4 * err_torch + 1e-5 * scale, (name, err_ours, err_torch)


@needs_torchvision
@pytest.mark.parametrize("name", ["resnet18"])
@pytest.mark.parametrize("fuse", [False, True])
def test_trained_like_torch(name, fuse):
    """Two SGD steps in training mode: the outputs and every state_dict entry, judged
    against a float64 run of torch's model beside torch's own float32 run. (MobileNetV2 is
    not a fair judge here: at this batch its ReLU6 boundaries make torch's float32
    gradients differ from float64 by as much as their own size in the first step.)"""
    base = torchvision_model(name, num_classes=10)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 64, 64, generator=gen)
    target = torch.randint(0, 10, (8,), generator=gen)
    out32, state32 = _train(copy.deepcopy(base).train(), x, target)
    out64, state64 = _train(copy.deepcopy(base).double().train(), x.double(), target)
    ours = bnkernels.convert_batchnorm(copy.deepcopy(base).train(), fuse=fuse)
    with kernels_only():
        out, state = _train(ours, x, target)
    assert state.keys() == state32.keys()
    _judged_against_float64(out, out32, out64, "output")
    for key in state32:
        if state32[key].is_floating_point():
            _judged_against_float64(state[key], state32[key], state64[key], key)
        else:
            assert torch.equal(state[key], state32[key]), key  # num_batches_tracked


@needs_timm
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_models_convert(name):
    """Every BatchNormAct2d becomes bnkernels' BatchNormDropAct2d: same state_dict keys, the
    same outputs in eval and in training, the same running statistics after a step."""
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model(name, num_classes=10))
    acts = _count(model, lambda m: qualified_name(m) == "timm.layers.norm_act.BatchNormAct2d")
    assert acts > 0
    ours, report = bnkernels.convert_batchnorm(copy.deepcopy(model), return_report=True)
    assert report.left == [] and len(report.converted) == _count(model, is_batchnorm)
    assert _count(ours, lambda m: isinstance(m, bnkernels.BatchNormDropAct2d)) == acts
    assert ours.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, 64, 64)
    atol, rtol = TOL[torch.float32]
    for training in (False, True):
        model.train(training), ours.train(training)
        with torch.no_grad(), kernels_only():
            got = ours(x)
        with torch.no_grad():
            want = model(x)
        torch.testing.assert_close(got, want, atol=20 * atol, rtol=20 * rtol)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, atol=1e-4, rtol=1e-4)


def _timm_bn_act(**kwargs):
    bn = timm.layers.BatchNormAct2d(6, **kwargs)
    randomize_norms(bn)
    return bn


@needs_timm
@pytest.mark.parametrize("act,fused", [(nn.ReLU, True), (nn.SiLU, True), ("gelu", True),
                                       (nn.Hardswish, False), (nn.PReLU, False)])
def test_timm_activation_fused_or_kept(act, fused):
    """relu, silu and gelu run fused; any other activation module runs after the BN, as it
    is (nn.PReLU's parameter keeps its key act.weight)."""
    bn = _timm_bn_act(act_layer=act)
    ours = bnkernels.convert_batchnorm(copy.deepcopy(bn))
    assert isinstance(ours, bnkernels.BatchNormDropAct2d)
    assert bnkernels.activations.of_module(ours.act)[0] == fused
    assert ours.state_dict().keys() == bn.state_dict().keys()
    x = torch.randn(3, 6, 5, 5, requires_grad=True)
    for training in (True, False):
        bn.train(training), ours.train(training)
        with kernels_only():
            got = ours(x)
        want = bn(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        g_got = torch.autograd.grad(got.sum(), x)[0]
        g_want = torch.autograd.grad(want.sum(), x)[0]
        torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-5)


@needs_timm
def test_timm_dropout_is_kept():
    """drop_layer (dropout between BN and act): the same mask as timm's under the same seed
    in training, identity in eval (then the act fuses)."""
    bn = _timm_bn_act(act_layer=nn.ReLU, drop_layer=lambda: nn.Dropout(0.5))
    ours = bnkernels.convert_batchnorm(copy.deepcopy(bn))
    x = torch.randn(3, 6, 5, 5)
    for training in (True, False):
        bn.train(training), ours.train(training)
        torch.manual_seed(3)
        want = bn(x)
        torch.manual_seed(3)
        with kernels_only():
            got = ours(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_timm
def test_timm_bn_act_folds_with_its_activation():
    """Folding a timm BatchNormAct2d keeps the act (and drop) it applied after the BN."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3), _timm_bn_act(act_layer=nn.SiLU)).eval()
    folded, report = bnkernels.fold_conv_bn(model, return_report=True)
    assert len(report.folded) == 1
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


class MyBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_convert_reports_what_it_left(caplog):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), MyBatchNorm(4),
                          nn.SyncBatchNorm(4), nn.LazyBatchNorm2d())
    with caplog.at_level(logging.INFO, logger="bnkernels.convert"):
        converted, report = bnkernels.convert_batchnorm(model, return_report=True)
    assert report.converted == [("1", "BatchNorm2d")]
    left = dict(report.left)
    assert "subclass of BatchNorm2d" in left["2"]
    assert "bnkernels.SyncBatchNorm.convert_sync_batchnorm" in left["3"]
    assert "lazy BatchNorm before its first call" in left["4"]
    assert type(converted[2]) is MyBatchNorm and type(converted[3]) is nn.SyncBatchNorm
    assert "left    2:" in caplog.text and "converted 1 BatchNorm(s)" in caplog.text


@needs_torchvision
def test_convert_reports_frozen_batchnorms():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), tv.ops.misc.FrozenBatchNorm2d(4))
    _, report = bnkernels.convert_batchnorm(model, return_report=True)
    assert "fold_conv_bn folds it" in dict(report.left)["1"]


@needs_torchvision
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_onnx_export_of_folded_torchvision(name, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = randomize_norms(torchvision_model(name)).eval()
    folded = bnkernels.fold_conv_bn(model)
    assert_onnx_export_matches(folded, model, torch.randn(1, 3, 64, 64), tmp_path / "m.onnx")
