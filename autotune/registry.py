"""The algorithms of each op, registered by the ops layer: (op, algorithm) -> runner, cost model,
"can run here", and the config spaces the planner chooses over.

An op here is one pass the planner chooses an algorithm for (``"conv3d"``, ``"conv3d_grad_input"``,
``"cp_conv3d_backward"``, ...). Every callable of an op's algorithms takes the same arguments,
which the op decides: its *problem* (what ``select.plan`` is given and passes through) for
``can_run``, ``cost_ms`` and ``configs``, its runner arguments for ``run``. Algorithms keep the
order they were registered in (the order candidates are listed and tables are printed).

Adding an algorithm to an op is one ``register`` call beside its runner.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(eq=False)
class Algorithm:
    """One algorithm of one op."""
    op: str
    name: str                         # what plans, LK3D_ALGO and the tables call it
    run: Callable                     # run(*args, config=None): the pass itself
    can_run: Callable[..., bool]      # can_run(*problem): whether it can run the problem here
    cost_ms: Callable[..., float]     # cost_ms(*problem): modelled milliseconds
    spaces: tuple = ()                # kernel kinds (lk3d.autotune.configs) whose config spaces
                                      # its plans are chosen over: part of the plan cache key
    configs: Optional[Callable] = None  # configs(*problem): launch configs worth measuring
    why_not: Optional[Callable[[torch.device], str]] = None  # why it may not run on a device
    launches: bool = False            # runs Triton launches: a plan without a config takes the
                                      # default one
    config_problem: Optional[Callable] = None  # config_problem(*problem): the configs.Problem
                                      # whose default config ``select.execute`` passes where the
                                      # plan has none (else the runner takes its own default)


_OPS: dict[str, dict[str, Algorithm]] = {}


def register(algorithm: Algorithm) -> Algorithm:
    """Add ``algorithm`` to its op; a second algorithm of the same op and name is a ValueError."""
    algos = _OPS.setdefault(algorithm.op, {})
    if algos.get(algorithm.name, algorithm) is not algorithm:
        raise ValueError(f"register: {algorithm.op} already has an algorithm {algorithm.name!r}")
    algos[algorithm.name] = algorithm
    return algorithm


def algorithms(op: str) -> list[Algorithm]:
    """The algorithms registered for ``op``, in registration order."""
    if op not in _OPS:
        raise ValueError(f"op: expected one of {sorted(_OPS)}, got {op!r}")
    return list(_OPS[op].values())


def find(op: str, name: str) -> Optional[Algorithm]:
    """The algorithm ``name`` of ``op``, or None."""
    return _OPS.get(op, {}).get(name)


def get(op: str, name: str) -> Algorithm:
    """The algorithm ``name`` of ``op``; a ValueError naming the registered ones if none."""
    found = find(op, name)
    if found is None:
        have = [a.name for a in algorithms(op)]
        raise ValueError(f"algorithm: {op} has {have}, got {name!r}")
    return found


def names() -> tuple[str, ...]:
    """Every registered algorithm name, once, in registration order."""
    return tuple(dict.fromkeys(name for algos in _OPS.values() for name in algos))


def launches(name: str) -> bool:
    """Whether an algorithm called ``name`` runs Triton launches (for any op)."""
    return any(a.launches for algos in _OPS.values() for a in algos.values() if a.name == name)


class Runners(Mapping):
    """``{algorithm: runner}`` of one op, read through the registry at each lookup."""

    def __init__(self, op: str):
        self.op = op

    def __getitem__(self, name):
        found = find(self.op, name)
        if found is None:
            raise KeyError(name)
        return found.run

    def __iter__(self):
        return iter(_OPS.get(self.op, {}))

    def __len__(self):
        return len(_OPS.get(self.op, {}))
