"""Autograd for bnkernels' BatchNorm, in every mode torch's own BatchNorm has.

  BatchNormFunction          y = act(bn(x) + residual) through ops.batch_norm_fwd (the
                             kernels). backward: through BatchNormBackwardFunction, so that
                             it is differentiable again. jvp (forward-mode AD): on the
                             kernels too, below. vmap: generated from the ops' batching rules
                             (ops.py), so torch.func.grad, jacrev, jacfwd, vmap and
                             functional_call all work.
  BatchNormBackwardFunction  the backward pass through ops.batch_norm_bwd (the kernels). Its
                             own derivative (double backward: gradient penalties, Hessian-
                             vector products) is the vjp of the plain-torch backward formula
                             (reference.backward_through_stats), whose batch statistics are
                             recomputed from x so that the paths through mean(x) and var(x)
                             are differentiated too. First-order passes always run on the
                             kernels; only the second-order ones run as plain torch ops.

Why two routes into the same formulas: torch.compile (dynamo) refuses an autograd.Function
with a custom jvp, so under compilation functional.py calls the op directly, and the op's
register_autograd formula below is the same backward.

The jvp of z = (x - mean) * gamma * rstd + beta + residual (then y = act(z)):
    training  dz = gamma * rstd * (dx - mean(dx) - xhat * mean(dx * xhat))
                   + dgamma * xhat + dbeta + dresidual
    eval      dz = gamma * rstd * dx + dgamma * xhat + dbeta + dresidual
The first term is the backward pass's input gradient with g = dx (BatchNorm's Jacobian
in x is symmetric), the next two the eval forward with (dgamma, dbeta) as its affine.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import activations, ops
from .backends import reference
from .backends.contract import RunningUpdate, apply_update
from .layout import acc_dtype


def _save(ctx, inputs, output, statistics_returned: bool = True) -> None:
    """What backward and jvp need (shared by every route). xhat is never saved: it is
    recomputed from x, and with an activation z = bn(x) + residual too (bias and residual
    are saved for that). statistics_returned: whether output's statistics are outputs of
    the Function (or op) too."""
    x, weight, bias, running_mean, running_var, training, eps, activation, residual = inputs[:9]
    y, mean, rstd, var = output
    if statistics_returned:  # statistics for the buffers, not the loss
        ctx.mark_non_differentiable(mean, rstd, var)
    # The statistics get no gradient: no zero-filled tensors for them in the backward.
    ctx.set_materialize_grads(False)
    # Training: the float32 (float64) batch mean and rstd; eval: the running mean and var.
    stats = (mean, rstd, None) if training else (running_mean, None, running_var)
    fused = activation is not None
    output = None
    if activation == "relu" and residual is not None:
        # relu' = (y > 0): keep y, which torch's relu keeps too, not the residual, which an
        # unfused add would let go (a downsample branch's output).
        output, residual = y, None
    ctx.save_for_backward(x, weight, bias if fused else None, residual if fused else None,
                          output, *stats)
    ctx.eps, ctx.activation = eps, activation
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_y, bwd):
    """The gradients of batch_norm_fwd's inputs; bwd runs the backward op (the op itself,
    or BatchNormBackwardFunction.apply where it must be differentiable again)."""
    needs = ctx.needs_input_grad
    dx, dweight, dbias, dres = _gradients(ctx, grad_y, bwd, needs[0], needs[1], needs[2],
                                          needs[8], body=bwd is _run_backward_direct)
    return dx, dweight, dbias, None, None, None, None, None, dres


def _gradients(ctx, grad_y, bwd, need_dx, need_dweight, need_dbias, need_dres,
               body: bool = False):
    """(dx, dweight, dbias, dresidual), each None where not wanted (_backward). body: bwd
    is the op's body (ops.run_backward, or a replay of it: eager.Forward.run_backward),
    which takes sum_dtypes."""
    if grad_y is None:  # y reached no loss (set_materialize_grads(False))
        return None, None, None, None
    x, weight, bias, residual, output, mean, rstd, var = ctx.saved_tensors
    fused_dres = need_dres and ctx.activation is not None
    args = (grad_y, x, weight, bias, residual, output, mean, rstd, var, ctx.eps,
            ctx.activation, need_dx, need_dweight or need_dbias, fused_dres)
    if body:  # the sums come back in the parameters' dtypes, written by the kernels
        dx, sum_g, sum_gx, dres = bwd(*args, sum_dtypes=(
            ctx.bias_dtype if need_dbias else None, weight.dtype if need_dweight else None))
    else:  # in the accumulation dtype (the op's schema): cast below
        dx, sum_g, sum_gx, dres = bwd(*args)
    if need_dres and not fused_dres:
        dres = grad_y  # z = bn(x) + residual with no activation: dL/dresidual = dL/dy
    return (dx if need_dx else None,
            _cast(sum_gx, weight.dtype) if need_dweight else None,
            _cast(sum_g, ctx.bias_dtype) if need_dbias else None,
            dres if need_dres else None)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _save_all(ctx, inputs, output) -> None:
    """What BatchNormFunction's backward and jvp need."""
    _save(ctx, inputs, output)
    ctx.direct = inputs[10]
    _save_for_jvp(ctx, inputs, output)


def _save_for_jvp(ctx, inputs, output) -> None:
    x, weight, bias, running_mean, running_var, training, _, _, residual = inputs[:9]
    y, mean, rstd, var = output
    # jvp: mean and a variance to normalize with, and (training) rstd for the backward
    # op's three-path input gradient.
    stats = (mean, var, rstd) if training else (running_mean, running_var, None)
    ctx.save_for_forward(x, weight, bias, residual, y, *stats)


class BatchNormFunction(torch.autograd.Function):
    """(y, mean, rstd, var) = ops.batch_norm_fwd(...), differentiable in x, weight, bias and
    residual in every autograd mode."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, training, eps, activation,
                residual, update, direct):
        # (update and direct: DirectBatchNormFunction's; here always None and False)
        return torch.ops.bnkernels.batch_norm_fwd(x, weight, bias, running_mean, running_var,
                                                  training, eps, activation, residual)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_all(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_rstd, _grad_var):
        # First order (no create_graph) on plain tensors: the op's body itself; else the
        # Function that is differentiable again.
        plain = ctx.direct and not torch.is_grad_enabled() and direct(grad_y)
        return (*_backward(ctx, grad_y, _run_backward_direct if plain else
                           BatchNormBackwardFunction.apply), None, None)

    @staticmethod
    def jvp(ctx, t_x, t_weight, t_bias, _t_rm, _t_rv, _t_training, _t_eps, _t_act, t_res,
            _t_update, _t_direct):
        x, weight, bias, residual, y, mean, var, rstd = ctx.saved_tensors
        eps, activation = ctx.eps, ctx.activation
        terms = []
        if t_x is not None:  # the backward op's dx with g = t_x: gamma * rstd * (...)
            terms.append(torch.ops.bnkernels.batch_norm_bwd(
                t_x, x, weight, None, None, None, mean, rstd, None if rstd is not None else var,
                eps, None, True, False, False)[0])
        if t_weight is not None or t_bias is not None:  # dgamma * xhat + dbeta
            if t_weight is None:
                t_weight = torch.zeros(x.shape[1], dtype=t_bias.dtype, device=x.device)
            terms.append(torch.ops.bnkernels.batch_norm_fwd(
                x, t_weight, t_bias, mean, var, False, eps, None, None)[0])
        if t_res is not None:
            terms.append(t_res)
        if not terms:
            return None, None, None, None
        t_z = terms[0]
        for term in terms[1:]:
            t_z = t_z + term
        if activation == "relu":  # relu' = (z > 0) = (y > 0)
            t_y = torch.where(y > 0, t_z, torch.zeros_like(t_z))
        elif activation is not None:
            z = torch.ops.bnkernels.batch_norm_fwd(x, weight, bias, mean, var, False, eps, None,
                                                   residual)[0]
            acc = acc_dtype(x.dtype)
            t_y = activations.grad(t_z.to(acc), z.to(acc), activation).to(y.dtype)
        else:
            t_y = t_z
        return t_y, None, None, None


class DirectBatchNormFunction(torch.autograd.Function):
    """BatchNormFunction on the direct route (direct()): the same backward and jvp, for
    less host time. Its forward is old-style, forward(ctx, ...): Function.apply binds a
    setup_context Function's arguments through inspect.signature on every call (tens of
    microseconds); setup_context serves the functorch transforms, which never take this
    route. Its one output is y: the statistics, which nothing outside needs, are saved
    as intermediates, not returned and marked non-differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, eps, activation,
                residual, update, direct):
        output = ops.run_forward(x, weight, bias, running_mean, running_var, training, eps,
                                 activation, residual, update, statistics=training)
        inputs = (x, weight, bias, running_mean, running_var, training, eps, activation,
                  residual, update, direct)
        _save(ctx, inputs, output, statistics_returned=False)
        ctx.direct = direct
        if getattr(forward_ad, "_current_level", 0) >= 0:  # a jvp may follow
            _save_for_jvp(ctx, inputs, output)
        return output[0]

    @staticmethod
    def backward(ctx, grad_y):
        return BatchNormFunction.backward(ctx, grad_y, None, None, None)

    @staticmethod
    def jvp(ctx, *tangents):
        return BatchNormFunction.jvp(ctx, *tangents)[0]


class ReplayRefused(Exception):
    """A replay (eager.py) declined a call before launching anything: it runs in full."""


class ReplayedBatchNormFunction(torch.autograd.Function):
    """DirectBatchNormFunction for a call eager.py replays: the same saved tensors and
    backward, with the launches the replay's (replay.outputs forward, replay.run_backward
    in the first-order backward). Fewer inputs (each costs host time in apply): the
    scalars are the replay's, the buffers (running mean, running var, num_batches_tracked)
    one tuple."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, replay, buffers):
        running_mean, running_var, num_batches_tracked = buffers
        output = replay.outputs(x, weight, bias, running_mean, running_var,
                                num_batches_tracked, residual)
        if output is None:
            raise ReplayRefused
        _save(ctx, (x, weight, bias, running_mean, running_var, replay.training, replay.eps,
                    replay.activation, residual), output, statistics_returned=False)
        ctx.replay = replay
        return output[0]

    @staticmethod
    def backward(ctx, grad_y):
        plain = not torch.is_grad_enabled() and direct(grad_y)
        needs = ctx.needs_input_grad
        dx, dweight, dbias, dres = _gradients(
            ctx, grad_y, ctx.replay.run_backward if plain else BatchNormBackwardFunction.apply,
            needs[0], needs[1], needs[2], needs[3], body=plain)
        return dx, dweight, dbias, dres, None, None


class BatchNormBackwardFunction(torch.autograd.Function):
    """ops.batch_norm_bwd(...), differentiable in grad_y, x, weight, bias and the residual."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_y, x, weight, bias, residual, output, mean, rstd, var, eps, activation,
                need_dx, need_sums, need_dres):
        return torch.ops.bnkernels.batch_norm_bwd(grad_y, x, weight, bias, residual, output,
                                                  mean, rstd, var, eps, activation, need_dx,
                                                  need_sums, need_dres)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:9])  # the tensors, grad_y to var
        ctx.flags = tuple(inputs[9:])

    @staticmethod
    def backward(ctx, *cotangents):
        return _double_backward(ctx.saved_tensors, ctx.flags, ctx.needs_input_grad, cotangents)


def _double_backward(saved, flags, needs_input_grad, cotangents):
    """The vjp of reference.backward_through_stats at the saved inputs: the gradients of the
    backward op's grad_y, x, weight, bias and residual (None for the rest)."""
    grad_y, x, weight, bias, residual, output, mean, rstd, var = saved
    tensors = [grad_y, x, weight, bias, residual]
    # (not output: relu's mask (y > 0) has derivative 0 almost everywhere)
    wrt = [i for i in range(len(tensors)) if tensors[i] is not None and needs_input_grad[i]]
    grads = [None] * (len(saved) + len(flags))
    if not wrt:
        return tuple(grads)

    def backward_of(*chosen: Tensor):
        full = list(tensors)
        for i, t in zip(wrt, chosen):
            full[i] = t
        return reference.backward_through_stats(*full, output, mean, rstd, var, *flags)

    _, vjp = torch.func.vjp(backward_of, *(tensors[i] for i in wrt))
    for i, g in zip(wrt, vjp(tuple(cotangents))):
        grads[i] = g
    return tuple(grads)


def _run_backward_direct(*args, sum_dtypes=(None, None)):
    return ops.run_backward(*args, placeholders=False, sum_dtypes=sum_dtypes)


def _op_backward(ctx, grad_y, _grad_mean, _grad_rstd, _grad_var):
    return _backward(ctx, grad_y, torch.ops.bnkernels.batch_norm_bwd)


def _op_setup_backward(ctx, inputs, output):
    BatchNormBackwardFunction.setup_context(ctx, inputs, output)


def _op_double_backward(ctx, *cotangents):
    return _double_backward(ctx.saved_tensors, ctx.flags, ctx.needs_input_grad, cotangents)


# The route torch.compile takes (see the module docstring): the ops' own autograd formulas.
ops.batch_norm_fwd.register_autograd(_op_backward, setup_context=_save)
ops.batch_norm_bwd.register_autograd(_op_double_backward, setup_context=_op_setup_backward)


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def direct(*tensors: Optional[Tensor]) -> bool:
    """Whether eager mode may run the ops' bodies (ops.run_forward, ops.run_backward) itself,
    past the dispatcher: plain tensors (no subclass, no functorch wrapper: vmap, grad, jvp
    of torch.func), and no dispatch mode (FakeTensor, make_fx, FlopCounterMode). Anything
    else takes the ops, whose fake and batching rules serve it. Why at all: the dispatcher's
    Python custom-op path costs more host time per call than the kernels' set-up."""
    if torch._C._len_torch_dispatch_stack() or \
            torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(t is None or type(t) in _PLAIN_TYPES for t in tensors)


def _records_a_graph(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd needs the Function: a differentiable input with grad mode on, or
    a forward-mode AD level open (its tangents need the jvp)."""
    if getattr(forward_ad, "_current_level", 0) >= 0:
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def batch_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   training: bool, eps: float, activation: Optional[str],
                   residual: Optional[Tensor], update: Optional[RunningUpdate] = None):
    """y with autograd, and update applied: BatchNormFunction in eager mode, the op itself
    (and its registered formula) under torch.compile.

    update (training): on the direct route the kernels update the running statistics in
    the launches that make the batch statistics; on the others (the ops are functional)
    torch ops do, after the op."""
    if torch.compiler.is_compiling():
        out = torch.ops.bnkernels.batch_norm_fwd(x, weight, bias, running_mean, running_var,
                                                 training, eps, activation, residual)
    elif direct(x, weight, bias, running_mean, running_var, residual,
                update and update.num_batches_tracked):
        if not _records_a_graph(x, weight, bias, residual):  # inference: no Function at all
            return ops.run_forward(x, weight, bias, running_mean, running_var, training, eps,
                                   activation, residual, update, statistics=False)[0]
        return DirectBatchNormFunction.apply(x, weight, bias, running_mean, running_var,
                                             training, eps, activation, residual, update,
                                             True)
    else:
        out = BatchNormFunction.apply(x, weight, bias, running_mean, running_var, training,
                                      eps, activation, residual, None, False)
    if update is not None:  # the ops are functional: torch ops update the buffers
        apply_update(update, out[1].detach(), out[3].detach(),
                     x.numel() // x.shape[1] if x.shape[1] else 0)
    return out[0]
