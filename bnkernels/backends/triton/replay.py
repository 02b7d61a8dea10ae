"""Replayed calls: a call whose launches were planned once is launched again without
planning, for every later call of the same signature.

Why: planning a call (launch.py's Launch: shapes, strides by role, constexpr switches,
each kernel's argument list, the pre-bound runner's key) costs more host time than the
rest of a small call. Everything it decides is a function of the call's signature: each
tensor's dtype and strides, x's shape and device, and the call's scalars (eps, activation,
momentum, flags). So the first call of a signature is planned and launched as usual, and
recorded: for each launch, its runner (the pre-bound compiled kernel, launch.py) and where
each argument came from, a tensor of the call (its slot), a temporary the planner
allocated, or a constant. A later call of that signature rebuilds the argument lists from
its own tensors and calls the runners.

What keeps a replay exact:
  - the signature holds everything the planner reads (launch.py's forward and backward
    build it beside the slots);
  - a launch whose arguments hold a tensor that is none of the call's and no recorded
    temporary (a copy the planner made), or a tensor that fills two slots (which one the
    planner meant is unknown), or a launch with no runner (the interpreter; bound
    launches off) makes the call not replayable: it is planned every time;
  - the runner was bound for 16-byte aligned pointers (launch.py's key): a call whose
    tensors are not all aligned is planned, never replayed;
  - the hooks that decide how a launch is made are part of the signature.
"""
from __future__ import annotations

import collections
import operator
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch

REPLAYS_MAX = 4096  # distinct signatures kept (a dynamic-shape workload would grow it forever)


def slot_key(slots: Sequence[Optional[torch.Tensor]]) -> Tuple[tuple, bool]:
    """Each slot's (dtype, strides) (None for an absent one), and whether every pointer is
    16-byte aligned: the part of a signature the call's tensors give, in one pass."""
    key = []
    bits = 0
    for t in slots:
        if t is None:
            key.append(None)
        else:
            key.append((t.dtype, t.stride()))
            bits |= t.data_ptr()
    return tuple(key), bits % 16 == 0


class Replay(NamedTuple):
    temporaries: Tuple[Callable[[tuple], torch.Tensor], ...]  # each from the call's slots
    constants: tuple
    launches: Tuple[Tuple[str, Callable, Callable], ...]  # (pass, runner, arguments getter)

    def run(self, slots: tuple, counts: collections.Counter) -> None:
        values = slots
        if self.temporaries:
            values = values + tuple(make(slots) for make in self.temporaries)
        values = values + self.constants
        for name, runner, arguments in self.launches:
            counts[name] += 1
            runner(*arguments(values))


class Recording:
    """What a planned call launched, in terms of its slots (Replay's docstring)."""

    def __init__(self, slots: Sequence[Optional[torch.Tensor]]):
        self.nslots = len(slots)
        self.where: dict = {}  # id(tensor) -> ("slot", i) / ("temp", j); None: two slots
        for i, t in enumerate(slots):
            if t is not None:
                self.where[id(t)] = None if id(t) in self.where else ("slot", i)
        self.temporaries: list = []
        self.kept: list = []  # the temporaries themselves: their ids stay theirs
        self.constants: list = []
        self.launches: list = []
        self.replayable = True

    def temporary(self, t: torch.Tensor, make: Callable[[tuple], torch.Tensor]) -> None:
        """t was allocated by the planner; make(slots) allocates its like for a replay."""
        self.where[id(t)] = ("temp", len(self.temporaries))
        self.temporaries.append(make)
        self.kept.append(t)

    def launch(self, name: str, runner: Optional[Callable], args: tuple) -> None:
        if runner is None:
            self.replayable = False
            return
        constexprs = getattr(runner, "constexprs", None)
        if constexprs is not None:  # launch.Runner: its launcher, the constexprs after args
            runner, args = runner.launcher, args + constexprs
        sources = []
        for a in args:
            if isinstance(a, torch.Tensor):
                source = self.where.get(id(a))
                if source is None:  # a copy the planner made, or a tensor in two slots
                    self.replayable = False
                    return
                sources.append(source)
            else:
                sources.append(("const", len(self.constants)))
                self.constants.append(a)
        self.launches.append((name, runner, sources))

    def replay(self) -> Optional[Replay]:
        if not self.replayable or not self.launches:
            return None
        offset = {"slot": 0, "temp": self.nslots,
                  "const": self.nslots + len(self.temporaries)}
        launches = tuple(
            (name, runner, operator.itemgetter(*(offset[kind] + i for kind, i in sources)))
            for name, runner, sources in self.launches)
        # itemgetter of one index returns the item, not a 1-tuple: every kernel has more
        assert all(len(sources) > 1 for _, _, sources in self.launches)
        return Replay(tuple(self.temporaries), tuple(self.constants), launches)
