"""convert_batchnorm(model, fuse=True): the fx pass that turns BN -> act and
BN -> add -> act into BatchNormAct modules, and leaves everything else as it computes."""
import contextlib
import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnkernels
from helpers import kernels_only, make_input

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import resnet  # noqa: E402


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: out += identity, then the block's shared ReLU."""

    def __init__(self, c, downsample=False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
                           if downsample else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Variants(nn.Module):
    """Activation spellings that fuse, and patterns that must not."""

    def __init__(self, c=4):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(8))
        self.shared = nn.BatchNorm2d(c)
        self.gelu_tanh = nn.GELU(approximate="tanh")

    def forward(self, x):
        b = self.bns
        y = F.silu(b[0](x))                         # function: fuses
        y = b[1](y).relu()                          # method: fuses
        y = F.gelu(b[2](y))                         # erf gelu: fuses
        y = self.gelu_tanh(b[3](y))                 # tanh gelu: stays
        t = b[4](y)
        y = torch.relu(t) + t                       # BN output used twice: stays
        r = y * 0.5
        r.add_(b[5](y))                             # in place into the residual: stays
        y = torch.add(b[6](r), r)                   # add without act: fuses (activation None)
        y = self.shared(y) + self.shared(y).relu()  # BN called twice: stays
        return F.relu(b[7](y) + y.mean(dim=(2, 3), keepdim=True))  # broadcast residual


def _fused_kinds(model):
    return {name: getattr(m, "activation", "plain") for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _random_stats(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def _check_same(model, fused, x, steps=2):
    """Training steps (outputs, every gradient, running statistics) then eval outputs."""
    reference = copy.deepcopy(model)
    fused_params = dict(fused.named_parameters())
    for step in range(steps):
        ys = []
        for m in (reference, fused):
            m.zero_grad()
            with kernels_only() if m is fused else contextlib.nullcontext():
                y = m(x + step)
                y.square().mean().backward()
            ys.append(y)
        torch.testing.assert_close(ys[1], ys[0], rtol=1e-4, atol=1e-4)
        for name, p in reference.named_parameters():
            torch.testing.assert_close(fused_params[name].grad, p.grad, rtol=1e-3, atol=1e-4,
                                       msg=f"grad of {name}")
    fused_buffers = dict(fused.named_buffers())
    for name, buf in reference.named_buffers():
        torch.testing.assert_close(fused_buffers[name], buf, rtol=1e-4, atol=1e-5, msg=name)
    reference.eval(), fused.eval()
    with torch.no_grad():
        expected = reference(x)
        with kernels_only():
            torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-4)


def test_bottleneck_resnet_fuses_and_matches(device):
    torch.manual_seed(0)
    model = resnet.tiny_resnet().to(device)
    _random_stats(model)
    state_keys = model.state_dict().keys()
    fused = bnkernels.convert_batchnorm(model, fuse=True)
    kinds = _fused_kinds(fused)
    # stem + every block's bn1, bn2 (relu) and bn3 (+ identity, relu); downsample BNs plain
    assert all(kind == "plain" for name, kind in kinds.items() if "downsample" in name)
    assert all(kind == "relu" for name, kind in kinds.items() if "downsample" not in name)
    assert sum(kind == "relu" for kind in kinds.values()) == 1 + 3 * 3
    assert all(type(m) is not nn.BatchNorm2d for m in fused.modules())  # the rest converted
    assert fused.state_dict().keys() == state_keys
    assert all(type(m) is nn.BatchNorm2d for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))  # the model is left as is
    _check_same(model, fused, make_input((2, 3, 16, 16), torch.float32, device))


@pytest.mark.parametrize("downsample", [False, True])
def test_basic_block_in_place_add_fuses(downsample, device):
    torch.manual_seed(0)
    model = nn.Sequential(BasicBlock(4, downsample), BasicBlock(4)).to(device)
    _random_stats(model)
    fused = bnkernels.convert_batchnorm(model, fuse=True)
    kinds = _fused_kinds(fused)
    assert kinds["0.bn1"] == kinds["0.bn2"] == kinds["1.bn2"] == "relu"
    x = make_input((2, 4, 5, 6), torch.float32, device, "channels_last")
    _check_same(model, fused, x)


def test_what_fuses_and_what_stays(device):
    torch.manual_seed(0)
    model = Variants().to(device)
    _random_stats(model)
    fused = bnkernels.convert_batchnorm(model, fuse=True)
    assert _fused_kinds(fused) == {
        "bns.0": "silu", "bns.1": "relu", "bns.2": "gelu", "bns.3": "plain", "bns.4": "plain",
        "bns.5": "plain", "bns.6": None, "bns.7": "relu", "shared": "plain"}
    # bns.7's residual broadcasts: that call takes the unfused path, with the same result
    _check_same(model, fused, make_input((2, 4, 3, 5), torch.float32, device))


def test_fused_model_compiles_fullgraph(device):
    backend = "inductor" if device == "cuda" else "aot_eager"
    torch.manual_seed(0)
    model = nn.Sequential(BasicBlock(4), BasicBlock(4)).to(device)
    fused = bnkernels.convert_batchnorm(model, fuse=True)
    x = make_input((2, 4, 5, 6), torch.float32, device)
    with kernels_only():
        eager = fused(x)
        compiled = torch.compile(fused, fullgraph=True, backend=backend)(x)
    torch.testing.assert_close(compiled, eager)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx can't trace it
            return torch.relu(self.bn(x))
        return self.bn(x)


def test_untraceable_model_converts_without_fusion(device):
    model = Untraceable().to(device)
    with pytest.warns(UserWarning, match="does not trace with torch.fx"):
        out = bnkernels.convert_batchnorm(model, fuse=True)
    assert out is model and type(model.bn) is bnkernels.BatchNorm1d
    x = make_input((4, 3), torch.float32, device, loc=1.0)
    with kernels_only():
        y = out(x)
    torch.testing.assert_close(y, torch.relu(F.batch_norm(x, None, None, training=True)))


def test_no_warning_when_traceable(device):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnkernels.convert_batchnorm(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()), fuse=True)
