"""convert_batchnorm: every torch BatchNorm at any depth swapped, state kept, same numbers."""
import copy

import torch
from torch import nn

import bnkernels
from helpers import kernels_only, make_bn, make_input


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 1)
        self.bn = nn.BatchNorm3d(4, momentum=None)
        self.heads = nn.ModuleDict({"a": nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)),
                                    "b": nn.BatchNorm1d(4, affine=False)})

    def forward(self, x):
        z = self.bn(self.conv(x)).mean(dim=(2, 3, 4))
        return self.heads["a"](z) + self.heads["b"](z).sum(dim=1, keepdim=True)


class MyBN(nn.BatchNorm2d):
    pass


def test_convert_nested_model(device):
    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.BatchNorm1d(5, track_running_stats=False)).to(device)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    reference = copy.deepcopy(model)
    params = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    converted = bnkernels.convert_batchnorm(model)
    assert converted is model
    kinds = [type(m) for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [bnkernels.BatchNorm3d, bnkernels.BatchNorm1d, bnkernels.BatchNorm1d,
                     bnkernels.BatchNorm1d]
    # the very same Parameter and buffer objects: optimizers keep working
    assert all(p is params[n] for n, p in converted.named_parameters())
    assert all(b is buffers[n] for n, b in converted.named_buffers())
    assert converted.state_dict().keys() == reference.state_dict().keys()
    for training in (True, False):
        converted.train(training), reference.train(training)
        x = make_input((6, 2, 3, 2, 2), torch.float32, device, loc=0.5)
        with kernels_only():
            y = converted(x)
        torch.testing.assert_close(y, reference(x), rtol=1e-5, atol=1e-5)
    for (n, a), b in zip(converted.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_convert_keeps_flags_dtype_and_skips_subclasses(device):
    model = nn.Sequential(make_bn(nn.BatchNorm2d, 3, bias=False, eps=1e-3), MyBN(3),
                          nn.BatchNorm2d(3).double()).to(device).eval()
    bnkernels.convert_batchnorm(model)
    assert type(model[0]) is bnkernels.BatchNorm2d and model[0].bias is None
    assert model[0].eps == 1e-3 and not model[0].training
    assert type(model[1]) is MyBN  # a user's subclass may have its own forward
    assert model[2].weight.dtype == torch.float64 and model[2].weight.device.type == device


def test_convert_keeps_a_missing_bias_where_torch_has_no_bias_flag(monkeypatch):
    """torch 2.11's BatchNorm has no bias=False: a bias set to None by hand must still come
    through the conversion as None (not as a new zero bias, not as a TypeError)."""
    from bnkernels import replace
    monkeypatch.setattr(replace, "_TAKES_BIAS_FLAG", False)
    bn = nn.BatchNorm2d(3)
    bn.register_parameter("bias", None)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 4, 4)
    new = bnkernels.convert_batchnorm(bn)
    assert type(new) is bnkernels.BatchNorm2d and new.bias is None and new.weight is bn.weight
    assert [n for n, _ in new.named_parameters()] == ["weight"]
    with kernels_only():
        y = new(x)
    torch.testing.assert_close(y, bn(x), rtol=1e-5, atol=1e-5)


def test_convert_a_bare_batchnorm():
    bn = nn.BatchNorm2d(4)
    new = bnkernels.convert_batchnorm(bn)
    assert type(new) is bnkernels.BatchNorm2d and new.weight is bn.weight
