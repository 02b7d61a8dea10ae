"""bnkernels.batch_norm: torch.nn.functional.batch_norm's signature and semantics.

Every check runs before anything is written, so a call that raises leaves the running
statistics (and num_batches_tracked, in the modules) as they were. Errors carry torch's
type and wording where torch has one.
"""
from __future__ import annotations

import numbers
import re
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import activations, autograd, eager
from .backends.contract import RunningUpdate
from .layout import ncs_shape


# torch's names of the scalar types, as its error messages spell them ('Long', 'Half').
_SCALAR_TYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
    torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
    torch.complex32: "ComplexHalf", torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def _eps_refusals() -> dict:
    """What the installed torch says of an eps <= 0, read off its own batch_norm once, at
    import: {(training, eps < 0): (error type, message before the eps, whether the eps
    follows), or None where torch accepts it}. The rule changed between releases: torch
    2.11 refuses every eps <= 0 ("must be positive"); 2.13 accepts eps = 0 in eval and words
    the training and the negative cases apart. A drop-in refuses what the torch beside it
    refuses, in its words."""
    refusals = {}
    x, mean, var = (torch.ones(2, 1, device="cpu"), torch.zeros(1, device="cpu"),
                    torch.ones(1, device="cpu"))
    for training in (False, True):
        for probe in (0.0, -1.0):
            verdict = None
            try:
                torch.nn.functional.batch_norm(x, mean.clone(), var.clone(), training=training,
                                               eps=probe)
            except Exception as error:  # noqa: BLE001 - whatever torch raises, we raise
                text, tail = str(error), str(probe)
                with_eps = text.endswith(tail)
                verdict = (type(error), text[:-len(tail)] if with_eps else text, with_eps)
            refusals[training, probe < 0.0] = verdict
    return refusals


_EPS_REFUSALS = _eps_refusals()
KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_REDUCED_FLOATS = (torch.float16, torch.bfloat16)


def scalar_type_name(dtype: torch.dtype) -> str:
    name = _SCALAR_TYPE_NAMES.get(dtype)
    if name is None:  # the rarer ones: torch.float8_e4m3fn -> Float8_e4m3fn, torch.uint16 -> UInt16
        name = str(dtype).replace("torch.", "")
        name = re.sub(r"^uint", "UInt", re.sub(r"^int", "Int", re.sub(r"^float", "Float", name)))
    return name


def check_momentum(momentum) -> Optional[float]:
    """momentum as a float (None stays None: the modules' cumulative average), or torch's
    TypeError, raised before anything is written."""
    if momentum is None or isinstance(momentum, float):
        return momentum
    # torch's parser takes a 0-dim tensor that does not require grad as a float
    if isinstance(momentum, numbers.Real) or (isinstance(momentum, Tensor) and momentum.dim() == 0
                                              and not momentum.requires_grad):
        return float(momentum)
    raise TypeError("batch_norm(): argument 'momentum' (position 7) must be float, not "
                    f"{type(momentum).__name__}")


def _check_dtypes(input: Tensor, params) -> None:
    """torch's rule for the per-channel tensors' dtypes: all of input's dtype, or (a float16
    or bfloat16 input, as AMP makes) all float32. The first tensor given decides which of
    the two rules applies, with torch's wording for each."""
    if not params:
        return
    if params[0].dtype != input.dtype:  # the mixed-dtype rule
        if any(t.dtype != torch.float32 for t in params):
            raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
        if input.dtype not in _REDUCED_FLOATS:
            raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")
        return
    for t in params:
        if t.dtype != input.dtype:
            raise RuntimeError(f"expected scalar type {scalar_type_name(input.dtype)} but found "
                               f"{scalar_type_name(t.dtype)}")


def check_batch_norm_args(input: Tensor, running_mean: Optional[Tensor],
                          running_var: Optional[Tensor], weight: Optional[Tensor],
                          bias: Optional[Tensor], training: bool, eps: float,
                          local_count_check: bool = True) -> None:
    """Every argument check, before anything is written; torch's error type and wording,
    in torch's order (checked against torch in tests/test_errors.py)."""
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    if input.dtype not in KERNEL_DTYPES:
        raise NotImplementedError(
            f'"batch_norm" not implemented for \'{scalar_type_name(input.dtype)}\'')
    if not training:
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is None:
                raise RuntimeError(f"{name} must be defined in evaluation mode")
    elif (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    n, c, s = ncs_shape(input)
    device = input.device
    named = (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
             ("bias", bias))  # torch's order of checks
    for name, t in named:
        if t is None:
            continue
        if t.numel() != c:
            raise RuntimeError(f"{name} should contain {c} elements not {t.numel()}")
        if t.device != device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but {name} is "
                               f"on {t.device} and input is on {device}")
    for name, t in named[:2]:
        if t is None:
            continue
        if t.dim() != 1:
            raise RuntimeError(f"TensorAccessor expected 1 dims but tensor has {t.dim()}")
        # Written in training: an expanded statistic (stride 0) would have every channel
        # write one element. torch's batch_norm lets one channel win; an in-place op refuses.
        if training and c > 1 and t.stride(0) == 0:
            raise RuntimeError("unsupported operation: more than one element of the written-to "
                               "tensor refers to a single memory location. Please clone() the "
                               "tensor before performing the operation.")
    _check_dtypes(input, [t for t in (weight, bias, running_mean, running_var) if t is not None])
    if torch.is_grad_enabled():
        for name, t in named[:2]:
            if t is not None and t.requires_grad:
                raise RuntimeError(f"The function 'native_batch_norm' is not differentiable with "
                                   f"respect to argument '{name}'. This input cannot have "
                                   "requires_grad True.")
    refusal = _EPS_REFUSALS[training, eps < 0.0] if eps <= 0.0 else None
    if refusal is not None:
        error, text, with_eps = refusal
        raise error(f"{text}{eps}" if with_eps else text)
    if training and local_count_check and n * s == 1:  # SyncBatchNorm counts globally
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input size {input.size()}")


def check_epilogue_args(input: Tensor, activation: Optional[str],
                        residual: Optional[Tensor]) -> None:
    """The fused epilogue's arguments: a known activation; a residual exactly like input
    (no broadcasting, no type promotion: the kernel adds it element for element)."""
    activations.check(activation)
    if residual is None:
        return
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a Tensor or None, not {type(residual).__name__}")
    if residual.shape != input.shape:
        raise RuntimeError(f"residual must have the input's shape {tuple(input.shape)}, "
                           f"got {tuple(residual.shape)}")
    if residual.dtype != input.dtype:
        raise RuntimeError(f"residual must have the input's dtype {input.dtype}, "
                           f"got {residual.dtype}")
    if residual.device != input.device:
        raise RuntimeError("Expected all tensors to be on the same device, but residual is "
                           f"on {residual.device} and input is on {input.device}")


def channel_vector(t: Optional[Tensor]) -> Optional[Tensor]:
    """A per-channel parameter as a (C,) vector: torch accepts any shape with C elements
    (a (1, C, 1, 1) weight, say). A view of it, so the gradient reaches the original."""
    return t if t is None or t.dim() == 1 else t.reshape(-1)


def batch_norm_impl(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                    momentum: Optional[float], eps: float,
                    num_batches_tracked: Optional[Tensor] = None,
                    activation: Optional[str] = None,
                    residual: Optional[Tensor] = None) -> Tensor:
    """batch_norm after the checks. Training with running statistics updates them (an
    empty batch leaves them alone, as torch does); num_batches_tracked, where given, is
    incremented by the call (a module's training step), and momentum=None takes the
    cumulative factor 1 / num_batches_tracked from it."""
    weight, bias = channel_vector(weight), channel_vector(bias)
    update = None
    if training and running_mean is not None:
        update = RunningUpdate(running_mean, running_var, momentum, num_batches_tracked)
    elif num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return autograd.batch_norm_fwd(input, weight, bias, running_mean, running_var, training,
                                   float(eps), activation, residual, update)


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
               activation: Optional[str] = None, residual: Optional[Tensor] = None) -> Tensor:
    """Batch Normalization over the channel dim 1 of an (N, C, *) input, like
    torch.nn.functional.batch_norm. training=True normalizes with batch statistics and, if
    running_mean/running_var are given, updates them in place with momentum.

    Fused epilogue: the result is activation(bn(input) + residual), in the same pass;
    activation "relu", "silu", "gelu" (erf form) or None, residual a tensor like input or
    None. The gradient reaches residual too."""
    if momentum is None:  # torch's op takes a float; the modules' None goes through batch_norm_impl
        raise TypeError("batch_norm(): argument 'momentum' (position 7) must be float, not "
                        "NoneType")
    return eager.forward(checked_batch_norm, input, running_mean, running_var, weight, bias,
                         training, check_momentum(momentum), eps, None, activation, residual)


def checked_batch_norm(input: Tensor, running_mean: Optional[Tensor],
                       running_var: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], training: bool, momentum: Optional[float],
                       eps: float, num_batches_tracked: Optional[Tensor],
                       activation: Optional[str], residual: Optional[Tensor]) -> Tensor:
    """batch_norm_impl after every check (nothing written before they pass): a call in
    full, as eager.forward makes it where it has no replay. Recorded for export, torch's
    ops after the same checks (torch_ops_batch_norm)."""
    if recording_for_export():
        return torch_ops_batch_norm(input, running_mean, running_var, weight, bias, training,
                                    momentum, eps, num_batches_tracked, activation, residual)
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, eps)
    check_epilogue_args(input, activation, residual)
    return batch_norm_impl(input, running_mean, running_var, weight, bias, training,
                           momentum, eps, num_batches_tracked, activation, residual)


def recording_for_export() -> bool:
    """Whether this call is being recorded into a graph meant to run without bnkernels:
    torch.jit.trace (and the TorchScript ONNX exporter, which traces) or torch.export (and
    the dynamo ONNX exporter and AOTInductor, which export). torch.compile is not one: its
    graphs run in this process, and call bnkernels' ops."""
    # Not torch.compiler.is_exporting(): torch 2.11's dynamo folds that call to True in
    # every trace, torch.compile's included (2.13's reads the flag). The flag it returns,
    # read here, is a plain value to dynamo on both; the call only where the flag is gone.
    # torch._C._is_tracing would break dynamo's graph; torch.jit.is_tracing is folded.
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return (torch.compiler.is_exporting() if flag is None else flag) or torch.jit.is_tracing()


def torch_ops_batch_norm(input: Tensor, running_mean: Optional[Tensor],
                         running_var: Optional[Tensor], weight: Optional[Tensor],
                         bias: Optional[Tensor], training: bool, momentum: Optional[float],
                         eps: float, num_batches_tracked: Optional[Tensor],
                         activation: Optional[str], residual: Optional[Tensor]) -> Tensor:
    """A call recorded for export: bnkernels' checks, then torch's own ops, the ones
    nn.BatchNorm*'s forward records: what an export holds in place of bnkernels' ops. Why:
    bnkernels' ops are Python custom ops, with no ONNX translation, no TorchScript form and
    no kernel that AOTInductor could package; aten's batch_norm has all three, and computes
    the same function. The counter moves and momentum=None averages as in torch's module."""
    if torch.jit.is_tracing():
        with warnings.catch_warnings():
            # A trace hands the checks sizes as traced values and warns that their verdicts
            # become constants: they are, for the traced shapes, as torch's own checks' are.
            # (Only here: dynamo, which torch.export runs, can't trace catch_warnings.)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            _check_all(input, running_mean, running_var, weight, bias, training, eps,
                       activation, residual)
    else:
        _check_all(input, running_mean, running_var, weight, bias, training, eps,
                   activation, residual)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            momentum = 1.0 / float(num_batches_tracked)
    y = torch.nn.functional.batch_norm(
        input, running_mean, running_var, channel_vector(weight), channel_vector(bias),
        training, 0.0 if momentum is None else momentum, eps)
    if residual is not None:
        y = y + residual
    return activations.apply(y, activation)


def _check_all(input, running_mean, running_var, weight, bias, training, eps, activation,
               residual) -> None:
    """checked_batch_norm's checks, for torch_ops_batch_norm's two branches."""
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, eps)
    check_epilogue_args(input, activation, residual)
