"""The (N, C, S) view and the launch plan: which views are read in place, and that the
grid fills a 132-SM GPU for both extremes of ResNet-50's BatchNorm shapes."""
import pytest
import torch

from bnkernels import layout


def test_ncs_strides():
    x = torch.empty(2, 3, 4, 5)
    assert layout.ncs_strides(x) == (60, 20, 1)
    assert layout.ncs_strides(x.contiguous(memory_format=torch.channels_last)) == (60, 1, 3)
    assert layout.ncs_strides(x[:, ::2]) == (60, 40, 1)
    assert layout.ncs_strides(x[:, :, 1:3]) == (60, 20, 1)
    assert layout.ncs_strides(x[..., ::2]) is None
    assert layout.ncs_strides(x.transpose(2, 3)) is None
    assert layout.ncs_strides(torch.empty(2, 3)) == (3, 1, 1)
    assert layout.ncs_strides(torch.empty(2, 3, 1, 5)[..., :1]) == (15, 5, 1)


def test_alloc_output_keeps_channels_last():
    x = torch.empty(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert layout.alloc_output(x).is_contiguous(memory_format=torch.channels_last)
    assert layout.alloc_output(x.transpose(2, 3)).is_contiguous()


@pytest.mark.parametrize("c,h", [(64, 112), (256, 56), (512, 28), (2048, 7)])
@pytest.mark.parametrize("channels_fast", [False, True])
def test_plan_fills_an_h100(c, h, channels_fast, monkeypatch):
    """One program per channel would leave 64 channels on 64 of 132 SMs."""
    monkeypatch.setattr(layout, "target_programs", lambda device: 4 * 132)
    plan = layout.launch_plan(128, c, h * h, channels_fast, torch.device("cuda"))
    programs = plan.c_blocks * plan.splits
    assert programs >= 132
    assert plan.splits * plan.rows_per_split >= 128 * h * h
    assert (plan.splits - 1) * plan.rows_per_split < 128 * h * h  # no split without rows
    assert plan.block_c * plan.block_r <= layout.GPU_TILE
