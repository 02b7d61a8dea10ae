"""convert_batchnorm(model, fuse=True): a torch.fx pass that fuses BatchNorm epilogues.

On the traced graph it rewrites
    bn(x) -> act                    into  BatchNormAct(x)            activation = act
    bn(x) -> add(., r) -> act       into  BatchNormAct(x, r)          (ResNet block ends)
    bn(x) -> add(., r)              into  BatchNormAct(x, r)          activation = None
(when both operands of the add are BatchNorms, the first one takes it: bn3(..) + downsample)
where bn is an nn.BatchNorm1d/2d/3d (torch's or bnkernels'), act is a ReLU, SiLU or GELU
(erf form) as a module (activations.of_module: timm's too), function or method, and add
is +, +=, torch.add or Tensor.add(_)
without alpha. A pattern is fused only when nothing else can see what the fusion removes:
the BN is called once and registered once, and each intermediate result (the BN output,
the sum) has that one user. An in-place add_ is fused only when it writes into the BN
output, never into the residual, which others may read (`out += identity` reaches the
graph as an out-of-place add: torch.fx records augmented assignment that way).

The result is an fx.GraphModule with the model's module hierarchy and state_dict keys;
the BatchNorms that did not fuse become bnkernels' (as convert_batchnorm). The model
passed in is left as it was (the new modules share its Parameters and buffers). A model
that does not trace is converted module by module, without fusion, with a warning.
"""
from __future__ import annotations

import collections
import operator
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import activations, modules
from .replace import ConvertReport, converted, replace_batchnorms

_FUSED = {nn.BatchNorm1d: modules.BatchNormAct1d, modules.BatchNorm1d: modules.BatchNormAct1d,
          nn.BatchNorm2d: modules.BatchNormAct2d, modules.BatchNorm2d: modules.BatchNormAct2d,
          nn.BatchNorm3d: modules.BatchNormAct3d, modules.BatchNorm3d: modules.BatchNormAct3d}

_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
                  F.silu: "silu", F.gelu: "gelu"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_IN_PLACE_ADDS = (operator.iadd, "add_")


class _Tracer(fx.Tracer):
    """Every BatchNorm (bnkernels' included) stays one call_module node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)


def _activation(node: fx.Node, gm: fx.GraphModule, src: fx.Node):
    """(True, name) if node applies a fusable activation to src alone, else (False, None)."""
    if not node.args or node.args[0] is not src:
        return False, None
    extra = dict(node.kwargs)
    extra.pop("inplace", None)  # the activation's input has no other user: in place or not
    name = None
    if node.op == "call_module":
        name = activations.of_module(gm.get_submodule(node.target))[1]
    elif node.op == "call_function":
        name = _ACT_FUNCTIONS.get(node.target)
        if name == "gelu" and extra.pop("approximate", "none") != "none":
            name = None
    elif node.op == "call_method":
        name = _ACT_METHODS.get(node.target)
    ok = name is not None and len(node.args) == 1 and not extra
    return ok, name if ok else None


def _residual(node: fx.Node, src: fx.Node, bn_targets) -> Optional[fx.Node]:
    """The other operand if node is src + other (a tensor node), else None."""
    is_add = ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
              or (node.op == "call_method" and node.target in _ADD_METHODS))
    if not is_add or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    other = b if a is src else a if b is src else None
    if other is None or other is src or not isinstance(other, fx.Node):
        return None
    if node.target in _IN_PLACE_ADDS and a is not src:
        return None  # residual += bn(x) writes into the residual: not ours to drop
    if a is not src and other.op == "call_module" and other.target in bn_targets:
        return None  # both operands are BatchNorms: the first one takes the add
    return other


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent), name, module)


def fuse_batchnorm(model: nn.Module, report: Optional[ConvertReport] = None) -> nn.Module:
    """The fused GraphModule described above (or, untraceable, replace_batchnorms(model)).
    report: filled with what was fused, converted and left."""
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # data-dependent control flow, untraceable ops, ...
        warnings.warn(f"convert_batchnorm(fuse=True): {type(model).__name__} does not trace "
                      f"with torch.fx ({type(error).__name__}: {error}); its BatchNorms are "
                      "converted without fusing their epilogues", stacklevel=3)
        return replace_batchnorms(model, report)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    registered = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    bn_targets = {n.target for n in graph.nodes
                  if n.op == "call_module" and type(gm.get_submodule(n.target)) in _FUSED}
    for bn_node in list(graph.nodes):
        if bn_node.op != "call_module":
            continue
        bn = gm.get_submodule(bn_node.target)
        if (type(bn) not in _FUSED or calls[bn_node.target] != 1 or registered[id(bn)] != 1
                or len(bn_node.args) != 1 or bn_node.kwargs):
            continue
        user = _only_user(bn_node)
        if user is None:
            continue
        residual = _residual(user, bn_node, bn_targets)
        removed = [user]
        if residual is not None:
            after_add = _only_user(user)
            ok, activation = (_activation(after_add, gm, user) if after_add is not None
                              else (False, None))
            if ok:
                removed.append(after_add)
        else:
            ok, activation = _activation(user, gm, bn_node)
            if not ok:
                continue
        last = removed[-1]
        with graph.inserting_before(last):
            args = (bn_node.args[0],) if residual is None else (bn_node.args[0], residual)
            fused = graph.call_module(bn_node.target, args)
        last.replace_all_uses_with(fused)
        for node in reversed(removed):
            graph.erase_node(node)
        graph.erase_node(bn_node)
        fused_bn = converted(bn, _FUSED[type(bn)], activation=activation)
        fused_bn._unfused_if_mismatch = residual is not None  # the add may have broadcast
        _set_submodule(gm, bn_node.target, fused_bn)
        if report is not None:
            report.converted.append((bn_node.target, type(bn).__name__))
            report.fused.append((bn_node.target, ("add + " if residual is not None else "")
                                 + (activation or "")))
    graph.lint()
    gm.recompile()
    return replace_batchnorms(gm, report)
