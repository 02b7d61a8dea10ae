"""The (N, C, S) view and the launch plan: which views are read in place, and that the
grid fills a 132-SM GPU for both extremes of ResNet-50's BatchNorm shapes."""
import pytest
import torch

from bnkernels import layout
from bnkernels.backends.cuda import plan as cuda_plan
from bnkernels.backends.triton import plan as triton_plan


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


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 3, 4, 5), (2, 1, 4, 5), (2, 3, 1, 5),
                                   (2, 3, 4, 1), (2, 3, 1, 1), (2, 3), (2, 3, 7),
                                   (2, 3, 2, 4, 5)])
def test_ncs_strides_fast_paths_agree_with_the_general_rule(shape):
    x = torch.empty(shape)
    views = [x, x[:, ::2] if shape[1] > 1 else x]
    if len(shape) == 4:
        views.append(x.contiguous(memory_format=torch.channels_last))
    if len(shape) == 5:
        views.append(x.contiguous(memory_format=torch.channels_last_3d))
    for view in views:
        assert layout.ncs_strides(view) == layout.strided_ncs_strides(view), view.stride()


def test_alloc_output_keeps_channels_last():
    x = torch.empty(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert layout.alloc_output(x).is_contiguous(memory_format=torch.channels_last)
    assert layout.alloc_output(x.transpose(2, 3)).is_contiguous()


@pytest.mark.parametrize("c,h", [(64, 112), (256, 56), (512, 28), (2048, 7)])
@pytest.mark.parametrize("channels_fast", [False, True])
def test_plan_fills_an_h100(c, h, channels_fast, monkeypatch):
    """One program per channel would leave 64 channels on 64 of 132 SMs."""
    monkeypatch.setattr(triton_plan, "target_programs", lambda device: 4 * 132)
    plan = triton_plan.launch_plan(128, c, h * h, channels_fast, torch.device("cuda"))
    programs = plan.c_blocks * plan.splits
    assert programs >= 132
    assert plan.splits * plan.rows_per_split >= 128 * h * h
    assert (plan.splits - 1) * plan.rows_per_split < 128 * h * h  # no split without rows
    assert plan.block_c * plan.block_r <= triton_plan.GPU_TILE


@pytest.mark.parametrize("c,h", [(64, 112), (256, 56), (512, 28), (2048, 7), (3, 5)])
@pytest.mark.parametrize("n", [1, 8, 128])
@pytest.mark.parametrize("channels_fast", [False, True])
def test_block_plan_of_the_cuda_backend(n, c, h, channels_fast, monkeypatch):
    """csrc/'s plan: a power-of-two block, every row in exactly one split, none empty, and
    at least one block per SM of a 132-SM GPU where the rows allow it."""
    monkeypatch.setattr(cuda_plan, "sm_count", lambda index: 132)
    plan = cuda_plan.block_plan(n, c, h * h, channels_fast, torch.device("cuda", 0))
    rows = n * h * h
    assert plan.threads == cuda_plan.CUDA_BLOCK_THREADS and plan.threads % plan.block_c == 0
    assert plan.block_c & (plan.block_c - 1) == 0
    assert plan.splits * plan.rows_per_split >= rows > (plan.splits - 1) * plan.rows_per_split
    blocks = -(-c // plan.block_c) * plan.splits
    lanes = plan.threads // plan.block_c
    assert blocks >= min(132, -(-c // plan.block_c) * -(-rows // (4 * lanes)))
