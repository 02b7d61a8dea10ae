"""fold_conv_bn: fold every eval-mode BatchNorm that can be folded into the layer before it.

Which pairs are safe is decided on the torch.fx graph (the model is traced, not rewritten):
a BatchNorm folds into a Conv{1,2,3}d, ConvTranspose{1,2,3}d or Linear when
  - the BN has running statistics (track_running_stats=True),
  - its input is that layer's output, and that output feeds nothing else,
  - the layer and the BN are each called once, registered once, and their tensors are read
    nowhere else (no weight tying),
  - the channel counts agree,
  - neither has a hook (forward, pre-forward or backward; nor a global module hook): a
    hook would see, or change, values the fold no longer computes.
Where the whole model does not trace (data-dependent control flow), its forward is read
from its source instead: a child the code only ever calls whole (`self.seq(x)`, never
`self.seq[0]`, `self.seq.conv`, nor passed along) is analysed as above; the BNs inside any
other child are left. Adjacent (layer, BN) children of an nn.Sequential that does not trace
fold under the same rule.

The BatchNorms: torch's and bnkernels' (subclasses included), and the frozen ones of
torchvision and timm (FrozenBatchNorm2d: constant statistics and affine, as buffers). What
a BN module applies after normalizing stays: the activation of bnkernels' BatchNormAct*,
the drop and act modules of timm's BatchNormAct2d and FrozenBatchNormAct2d (and of
bnkernels' BatchNormDropAct2d). A subclass with other submodules is left: its forward may
apply them in ways the fold cannot keep.

The fold itself is module surgery on the model: the layer gets the folded weight and bias
(fold_math.py), and the BN is replaced by a FoldedBatchNorm, which checks its input has
the layer's batched rank (the one case where the math would not hold is a Linear on a 3-D
input, whose features are not on dim 1) and then applies what the BN applied after
normalizing (nothing, for a plain BN). The model keeps its class and its forward code; BNs
that stay are swapped for bnkernels' (their eval kernel).
"""
from __future__ import annotations

import ast
import collections
import copy
import inspect
import logging
import textwrap
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import activations
from .fold_math import fold_bn_into_weights
from .modules import _BatchNormActForward
from .replace import is_frozen_batchnorm, qualified_name, replace_batchnorms

log = logging.getLogger("bnkernels.fold")

# layer class -> the rank of its batched output (channels on dim 1 at that rank)
FOLDABLE = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5, nn.ConvTranspose1d: 3,
            nn.ConvTranspose2d: 4, nn.ConvTranspose3d: 5, nn.Linear: 2}


@dataclass
class FoldReport:
    """What fold_conv_bn did: folded (layer, bn) pairs, and the BNs left with the reason."""
    folded: List[Tuple[str, str]] = field(default_factory=list)
    left: List[Tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BatchNorm(s), left {len(self.left)}"]
        lines += [f"  folded  {bn} into {layer}" for layer, bn in self.folded]
        lines += [f"  left    {bn}: {reason}" for bn, reason in self.left]
        return "\n".join(lines)


# Classes whose forward is the BatchNorm, then self.drop, then self.act.
_DROP_ACT = ("timm.layers.norm_act.BatchNormAct2d", "timm.layers.norm_act.FrozenBatchNormAct2d",
             "bnkernels.norm_act.BatchNormDropAct2d")


def is_batchnorm(m: nn.Module) -> bool:
    """A module fold_conv_bn can fold: a BatchNorm, or a frozen one."""
    return isinstance(m, _BatchNorm) or is_frozen_batchnorm(m)


def after_norm(bn: nn.Module) -> Optional[Dict[str, nn.Module]]:
    """The modules bn applies, in order, after normalizing; None where that is unknown (a
    subclass with submodules of its own)."""
    if isinstance(bn, _BatchNormActForward):
        return {"act": activations.module_of(bn.activation)}
    if qualified_name(bn) in _DROP_ACT:
        return {"drop": bn.drop, "act": bn.act}
    return None if len(bn._modules) else {}


def _num_features(bn: nn.Module) -> int:
    return bn.running_mean.numel()


class FoldedBatchNorm(nn.Module):
    """Stands where a BatchNorm was folded into the layer before it: checks its input has
    the rank the fold assumed (channels on dim 1), then applies what the BatchNorm applied
    after normalizing (its `after` modules, under their names: a state_dict keeps their
    keys), if anything."""

    def __init__(self, num_features: int, rank: int,
                 after: Optional[Dict[str, nn.Module]] = None):
        super().__init__()
        self.num_features, self.rank = num_features, rank
        for name, module in (after or {}).items():
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.rank:
            raise RuntimeError(
                f"a BatchNorm folded by bnkernels.fold_conv_bn expected a {self.rank}-D input "
                f"(channels on dim 1) and got {x.dim()}-D: the fold does not hold for this "
                "input; use the unfolded model")
        for module in self._modules.values():
            x = module(x)
        return x

    def extra_repr(self) -> str:
        return f"{self.num_features}, rank={self.rank}"


class _LeafTracer(fx.Tracer):
    """BatchNorms and foldable layers stay call_module nodes (bnkernels' BN included)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_batchnorm(m) or type(m) in FOLDABLE or super().is_leaf_module(m, qualname)


class _Analysis:
    """Finds the safe (layer, bn) pairs of a model: pairs[bn] = layer; reasons[bn] = why not."""

    def __init__(self, model: nn.Module):
        self.pairs: Dict[str, str] = {}
        self.reasons: Dict[str, str] = {}
        self.registrations = collections.Counter(
            id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.tensor_names = collections.Counter(
            id(t) for _, t in model.named_parameters(remove_duplicate=False))
        self.tensor_names.update(id(t) for _, t in model.named_buffers(remove_duplicate=False))
        self.visit(model, "")

    def visit(self, module: nn.Module, prefix: str) -> None:
        try:
            graph = _LeafTracer().trace(module)
        except Exception as error:  # data-dependent control flow, untraceable ops, ...
            log.debug("%s does not trace (%s): folding inside its parts", prefix or "model", error)
            if isinstance(module, nn.Sequential):
                self.visit_sequential(module, prefix)
            whole_only = _children_only_called_whole(module)
            for name, child in module.named_children():
                if is_batchnorm(child) or type(child) in FOLDABLE:
                    continue
                if name in whole_only:
                    self.visit(child, prefix + name + ".")
                else:
                    self.leave_inside(child, prefix + name + ".", f"{prefix or 'the model'}'s "
                                      f"forward does not trace and reaches into {prefix}{name} "
                                      "(or its source cannot be read)")
            return
        self.visit_graph(graph, module, prefix)

    def visit_graph(self, graph: fx.Graph, module: nn.Module, prefix: str) -> None:
        calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
        read_attrs = [n.target for n in graph.nodes if n.op == "get_attr"]
        for node in graph.nodes:
            if node.op != "call_module" or not is_batchnorm(module.get_submodule(node.target)):
                continue
            src = node.args[0] if node.args else None
            layer_target = src.target if isinstance(src, fx.Node) and src.op == "call_module" else None
            if calls[node.target] > 1:
                why = "the BatchNorm module is called more than once"
            else:
                why = self.why_not(module, node.target, layer_target)
            if why is None and calls[layer_target] > 1:
                why = f"{prefix}{layer_target} is called more than once"
            elif why is None and len(src.users) > 1:
                why = f"the output of {prefix}{layer_target} also feeds something else"
            elif why is None and len(node.args) + len(node.kwargs) > 1:
                why = "the BatchNorm is called with more than one argument"
            elif why is None and any(a == t or a.startswith(t + ".")
                                     for a in read_attrs for t in (node.target, layer_target)):
                why = "its tensors or the layer's are read elsewhere in forward"
            self.record(prefix + node.target, prefix + layer_target if layer_target else None, why)

    def visit_sequential(self, seq: nn.Sequential, prefix: str) -> None:
        names = list(seq._modules)
        for i, name in enumerate(names):
            if is_batchnorm(seq._modules[name]):
                layer = names[i - 1] if i > 0 else None
                self.record(prefix + name, prefix + layer if layer else None,
                            self.why_not(seq, name, layer))

    def leave_inside(self, module: nn.Module, prefix: str, why: str) -> None:
        for name, m in module.named_modules():
            if is_batchnorm(m):
                self.record(prefix + name if name else prefix.rstrip("."), None, why)

    def why_not(self, owner: nn.Module, bn_name: str, layer_name) -> "str | None":
        """The reasons that need no graph: statistics, layer type, hooks, sharing, channels."""
        bn = owner.get_submodule(bn_name)
        if bn.running_mean is None or bn.running_var is None:
            return "no running statistics (track_running_stats=False)"
        if after_norm(bn) is None:
            return (f"{type(bn).__name__} has submodules of its own, which its forward may "
                    "apply in ways the fold cannot keep")
        if layer_name is None:
            return "its input is not the output of a module"
        layer = owner.get_submodule(layer_name)
        if type(layer) not in FOLDABLE:
            return f"its input comes from {type(layer).__name__}, which does not fold"
        if _has_hooks(layer) or _has_hooks(bn):
            return "the layer or the BatchNorm has hooks, which would see values the fold removes"
        if self.registrations[id(layer)] > 1 or self.registrations[id(bn)] > 1:
            return "the layer or the BatchNorm is registered under several names (shared)"
        if any(self.tensor_names[id(t)] > 1 for t in (*layer.parameters(), *bn.parameters(),
                                                      *bn.buffers())):
            return "a tensor of the layer or the BatchNorm is shared with another module"
        out_channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if out_channels != _num_features(bn):
            return f"channel counts differ ({out_channels} vs {_num_features(bn)})"
        return None

    def record(self, bn_name: str, layer_name, why) -> None:
        if why is None:
            self.pairs[bn_name] = layer_name
            self.reasons.pop(bn_name, None)
        elif bn_name not in self.pairs:
            self.reasons[bn_name] = why


def _has_hooks(m: nn.Module) -> bool:
    own = (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
           getattr(m, "_backward_pre_hooks", {}))
    glob = nn.modules.module
    shared = (glob._global_forward_hooks, glob._global_forward_pre_hooks,
              glob._global_backward_hooks, getattr(glob, "_global_backward_pre_hooks", {}))
    return any(len(h) for h in own + shared)


# Ways for code to reach a module's children other than naming them one by one.
_REFLECTION = {"_modules", "children", "named_children", "modules", "named_modules",
               "get_submodule", "__dict__"}


def _children_only_called_whole(module: nn.Module) -> set:
    """The names of module's children that its class's code (every method) only ever uses
    as `self.<name>(...)`: proof that a pair inside such a child is computed only where the
    child runs whole. Empty when the source can't be read or the code reflects over its
    children (getattr, self._modules, self.children(), ...)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(module))))
    except (OSError, TypeError, SyntaxError):
        return set()
    names = set(module._modules)
    other = collections.Counter()
    # __init__ builds the children; the other methods are what forward may run.
    methods = [n for n in ast.walk(tree)
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name != "__init__"]
    nodes = [node for m in methods for node in ast.walk(m)]
    called = {id(n.func) for n in nodes if isinstance(n, ast.Call)}
    for node in nodes:
        if isinstance(node, ast.Name) and node.id == "getattr":
            return set()
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "self":
            if node.attr in _REFLECTION:
                return set()
            if id(node) not in called and not isinstance(node.ctx, ast.Store):
                other[node.attr] += 1
        if isinstance(node, ast.Constant) and node.value in names:  # setattr/getattr by name
            other[node.value] += 1
    return {n for n in names if other[n] == 0}


def _fold_pair(model: nn.Module, layer_name: str, bn_name: str) -> None:
    layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    with torch.no_grad():
        weight, bias = fold_bn_into_weights(
            layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,
            bn.weight, bn.bias, transposed=transposed, groups=getattr(layer, "groups", 1))
    grad = layer.weight.requires_grad
    bias_grad = grad if layer.bias is None else layer.bias.requires_grad
    layer.weight = nn.Parameter(weight, requires_grad=grad)
    layer.bias = nn.Parameter(bias, requires_grad=bias_grad)
    parent_name, _, child = bn_name.rpartition(".")
    setattr(model.get_submodule(parent_name), child,
            FoldedBatchNorm(_num_features(bn), FOLDABLE[type(layer)], after_norm(bn)))


def fold_conv_bn(model: nn.Module, inplace: bool = False, return_report: bool = False):
    """An eval-mode model with every foldable BatchNorm folded into the layer before it.

    model: left unchanged unless inplace=True. A model in training mode is folded as an
    eval-mode copy (inplace=True then raises: the model would change mode).
    return_report: return (model, FoldReport) — what was folded, what was left and why.
    The same is logged on the "bnkernels.fold" logger (INFO).
    """
    if inplace and model.training:
        raise ValueError("fold_conv_bn(inplace=True) needs a model in eval mode: call "
                         "model.eval() first, or pass inplace=False to fold an eval copy")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    analysis = _Analysis(model)
    report = FoldReport()
    bn_names = [n for n, m in model.named_modules() if is_batchnorm(m) and n]
    for bn_name in bn_names:
        if bn_name in analysis.pairs:
            _fold_pair(model, analysis.pairs[bn_name], bn_name)
            report.folded.append((analysis.pairs[bn_name], bn_name))
        else:
            report.left.append((bn_name, analysis.reasons.get(
                bn_name, "not reached in a forward that could be traced")))
    model = replace_batchnorms(model)  # what is left runs bnkernels' eval kernel
    for line in str(report).splitlines():
        log.info(line)
    return (model, report) if return_report else model
