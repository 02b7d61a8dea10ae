"""How a BatchNorm tensor is laid out for the kernels (every backend shares this).

Every input (N, C, *spatial) is read as an (N, C, S) view through three strides
(sN, sC, sS), so NCHW, channels_last and many strided views need no copy. Only a view
whose spatial dims do not collapse into one stride (a transposed H/W, say) is copied.

Rows are the flattened (n, s) pairs of a channel: r = n * S + s. How a launch is shaped is each
backend's own: backends/triton/plan.py, backends/cuda/plan.py.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

Strides = Tuple[int, int, int]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics accumulate in float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ncs_shape(x: torch.Tensor) -> Tuple[int, int, int]:
    n, c = x.shape[0], x.shape[1]
    s = 1
    for size in x.shape[2:]:
        s *= size
    return n, c, s


def ncs_strides(t: torch.Tensor) -> Optional[Strides]:
    """(sN, sC, sS) of t read as (N, C, S), or None when its spatial dims don't collapse."""
    # The two common layouts first: this runs several times per call, on the host.
    if t.is_contiguous():
        return t.stride(0), t.stride(1), 1
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.stride(0), t.stride(1), t.shape[1] if t.shape[2] * t.shape[3] > 1 else 1
    return strided_ncs_strides(t)


def strided_ncs_strides(t: torch.Tensor) -> Optional[Strides]:
    """ncs_strides for any strided view: the spatial dims of size > 1, innermost first, must
    each be the previous one's stride times its size."""
    inner = None  # stride of the innermost spatial dim of size > 1
    expected = None  # the stride the next spatial dim out must have to collapse
    for size, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if size == 1:
            continue
        if inner is None:
            inner = stride
        elif stride != expected:
            return None
        expected = stride * size
    if inner is None:
        inner = 1
    return t.stride(0), t.stride(1), inner


def alloc_output(x: torch.Tensor) -> torch.Tensor:
    """The output (and input gradient) of a call on x, with torch's strides: channels_last
    (channels_last_3d) where x is in that format, contiguous otherwise, whatever x's own
    strides (a transposed or N/C-swapped view gives a contiguous result, so y.view(-1)
    works wherever it works on torch's). The fake (meta) implementations call this too, so
    compiled and eager strides agree."""
    out = torch.empty_like(x)  # x's strides if x is dense, else torch's suggested format
    if out.is_contiguous() or any(out.dim() == d and out.is_contiguous(memory_format=f)
                                  for d, f in _CHANNELS_LAST):
        return out
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_CHANNELS_LAST = ((4, torch.channels_last), (5, torch.channels_last_3d))


def kernel_ready(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t itself if the kernels can read it through strides, else a contiguous copy (None
    for an optional tensor the call doesn't have)."""
    if t is None:
        return None
    return t if ncs_strides(t) is not None else t.contiguous()


def next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()
