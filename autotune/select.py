"""Which algorithm runs a convolution: forced, cached, measured, or modelled — in that order.

    LK3D_ALGO=tiled|fft|aten   force one (where it can run here; else a warning, once per
                               algorithm and reason in a process, and the choice goes on as usual);
                               any registered algorithm's name is taken (``sparse``/``dense``:
                               block-sparse's routes); an op without it chooses as if unset
    LK3D_AUTOTUNE=1            measure the candidates on a cache miss and store the winner
    LK3D_AUTOTUNE=0            never measure, also not inside ``tune()``
    with lk3d.autotune.tune(): measure on a cache miss, for the calls inside the block

A plan is keyed by the device fingerprint, the problem key (op, dtype, channels, groups, kernel,
stride, dilation, padding exactly; batch and spatial sizes bucketed to powers of two) and a hash of
the candidate list with the config spaces behind it (``cache.space_hash``). Modelled plans are not
stored: a later measurement may still fill the entry. The choice is made where the op runs, never
while a graph is traced, so ``torch.compile`` sees one node whatever is chosen.

This module knows nothing of the algorithms themselves: the ops layer registers them
(``lk3d.autotune.registry``: runner, cost model, "can run here", config spaces) and ``plan`` asks
them about a problem; ``choose`` takes the candidates, a cost model (milliseconds per candidate)
and a way to run each one directly.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from lk3d.autotune import configs as config_spaces
from lk3d.autotune import registry
from lk3d.autotune.cache import default_cache, problem_key, space_hash
from lk3d.autotune.fingerprint import device_id
from lk3d.autotune.timing import time_ms  # the planner's measurement

MODEL_VERSION = 1  # bump when the meaning of stored plans changes
_local = threading.local()
_forced_warned: set = set()  # (algo, reason) of the LK3D_ALGO warnings given in this process
_forced_lock = threading.Lock()


def __getattr__(name):
    if name == "ALGOS":  # every registered algorithm's name, in registration order
        return registry.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Plan:
    algo: str                  # a registered algorithm: "tiled" | "fft" | "aten"
    source: str                # "forced" | "cache" | "seed" | "measured" | "model" | "only"
    key: str                   # the problem key
    config: Optional[dict] = None  # a launch config (algorithms with launches); None = default
    times_ms: dict = field(default_factory=dict)  # measured (or modelled) ms per candidate
    note: str = ""

    def as_dict(self):
        return dict(algo=self.algo, source=self.source, key=self.key, config=self.config,
                    times_ms=self.times_ms, note=self.note)


class Plans(dict):
    """The plans of one call, by pass (``"forward"``, ``"grad_input"``, ...): a dict of plan
    dicts (``Plan.as_dict``), as ``lk3d.explain`` returns it, whose ``repr`` is a table, one row per
    pass: the algorithm, where the choice came from, the launch config and the milliseconds per
    candidate (measured for ``measured``/``cache``/``seed`` plans, modelled for ``model`` ones;
    none for ``forced`` ones). ``title`` (the call, in words) heads the table."""

    def __init__(self, plans=(), title: str = ""):
        super().__init__(plans)
        self.title = title

    def __repr__(self) -> str:
        return self.table()

    def table(self) -> str:
        algos = [a for a in registry.names()
                 if any(a in p.get("times_ms", {}) for p in self.values())]
        algos += list(dict.fromkeys(a for p in self.values() for a in p.get("times_ms", {})
                                    if a not in algos))
        notes = list(dict.fromkeys(p.get("note", "") for p in self.values()))
        with_note = len(notes) > 1  # one note for every pass is said once, below the table
        header = ["pass", "algo", "source", "config"] + [f"{a} ms" for a in algos] + \
            (["note"] if with_note else [])
        rows = []
        for name, p in self.items():
            times = p.get("times_ms", {})
            rows.append([name, str(p.get("algo", "?")), str(p.get("source", "?")),
                         _config_text(p.get("algo"), p.get("config"))]
                        + [_ms_text(times.get(a)) for a in algos]
                        + ([p.get("note", "")] if with_note else []))
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        right = {i for i, h in enumerate(header) if h.endswith(" ms")}

        def line(cells):
            return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        out = ([self.title] if self.title else []) + [line(header),
                                                      line(["-" * w for w in widths])]
        out += [line(r) for r in rows]
        if algos:
            out.append("ms: measured where the source is measured, cache or seed; modelled "
                       "where it is model")
        if not with_note and notes and notes[0]:
            out.append(f"note: {notes[0]}")
        return "\n".join(out)


def _config_text(algo, config) -> str:
    if config:
        return " ".join(f"{k}={v}" for k, v in config.items())
    return "default" if registry.launches(algo) else "-"


def _ms_text(ms) -> str:
    if ms is None:
        return "-"
    if math.isinf(ms):
        return "inf"
    return f"{ms:.1f}" if ms >= 100 else f"{ms:.3g}"


def forced_algo() -> Optional[str]:
    algo = os.environ.get("LK3D_ALGO", "").strip().lower()
    if algo in ("", "auto"):
        return None
    if algo not in registry.names():
        raise ValueError(f"LK3D_ALGO: expected 'auto' or one of {registry.names()}, got {algo!r}")
    return algo


def _why_not(algo: str, op: str, device: torch.device, candidates: Sequence[str]) -> str:
    """Why a forced ``algo`` is not among ``candidates``: the algorithm's own reason where it has
    one, else the candidates."""
    found = registry.find(op, algo)
    if found is not None and found.why_not is not None:
        return found.why_not(device)
    return f"{op} on {device.type} chooses among {', '.join(candidates)} only"


def _warn_forced(by: str, algo: str, reason: str) -> None:
    """Warn that ``by=algo`` (``LK3D_ALGO=algo``, or a caller's own switch) is ignored, once per
    (by, algo, reason) in this process."""
    with _forced_lock:
        if (by, algo, reason) in _forced_warned:
            return
        _forced_warned.add((by, algo, reason))
    warnings.warn(f"{by}={algo} cannot run here: {reason}; the algorithm is chosen as if "
                  "it were unset (said once per process)", RuntimeWarning, stacklevel=4)


def measuring() -> bool:
    """Whether a cache miss is measured now (LK3D_AUTOTUNE, or inside ``tune()``)."""
    env = os.environ.get("LK3D_AUTOTUNE", "").strip()
    if env not in ("", "0", "1"):
        raise ValueError(f"LK3D_AUTOTUNE: expected '0' or '1', got {env!r}")
    if env == "0":
        return False
    return env == "1" or getattr(_local, "tuning", 0) > 0


@contextlib.contextmanager
def tune():
    """Measure the candidates of every convolution in the block whose plan is not cached yet,
    and store the winners in the persistent cache."""
    _local.tuning = getattr(_local, "tuning", 0) + 1
    try:
        yield
    finally:
        _local.tuning -= 1


def space_of(candidates: Sequence[str], kernels: Sequence[str]) -> str:
    """Hash of what a plan was chosen from: the candidates and the config spaces of the kernel
    kinds ``kernels`` (as registered with ``lk3d.autotune.configs``)."""
    return _space_of(tuple(candidates), tuple(kernels))


@functools.lru_cache(maxsize=256)
def _space_of(candidates, kernels):
    spaces = [{"model": MODEL_VERSION, "candidates": list(candidates)}]
    spaces += [{"kernel": k, "configs": config_spaces.space(k)} for k in kernels]
    return space_hash(spaces)


def choose(op: str, key: str, device: torch.device, candidates: Sequence[str],
           model_ms: Callable[[str], float], run: Optional[Callable[[str], object]] = None,
           kernels: Sequence[str] = (), preferred: Optional[str] = None, *,
           configs: Optional[Callable[[str], Sequence[dict]]] = None,
           forced: Optional[tuple[str, str]] = None) -> Plan:
    """The plan for one problem.

    ``candidates``: the algorithms that can run it here; ``model_ms(algo)``: modelled ms;
    ``run(algo)``: runs it once (for measuring); ``kernels``: config spaces behind "tiled";
    ``preferred``: an algorithm that wins over cache and model when nothing is forced (the
    Triton interpreter's CPU runs, whose purpose is to execute the kernels); ``configs(algo)``:
    launch configs to measure for an algorithm (then run is called as ``run(algo, config)``);
    ``forced``: ``(algo, by)``, an algorithm the caller forces and the switch that says so (e.g.
    ``("dense", "lk3d.block_sparse.ROUTE")``): it takes the place of ``LK3D_ALGO``, and is obeyed
    or warned about as LK3D_ALGO is."""
    env = forced_algo()  # read (and checked) on every call
    algo, by = forced if forced is not None else (env, "LK3D_ALGO")
    tuning = measuring()  # read (and checked) on every call, not only on a cache miss
    if algo is not None and algo in candidates:
        return Plan(algo, "forced", key)
    note = ""
    if algo is not None:
        reason = _why_not(algo, op, device, candidates)
        note = f"{by}={algo} cannot run here: {reason}"
        _warn_forced(by, algo, reason)
    if preferred is not None and preferred in candidates:
        return Plan(preferred, "model", key, note=note or "interpreter: the kernels are the test")
    fid = device_id(device)
    space = space_of(candidates, kernels)
    cache = default_cache()
    hit = cache.get(fid, key, space)
    if hit is not None and hit.get("algo") in candidates:
        source = "seed" if hit.get("source") == "seed" else "cache"
        return Plan(hit["algo"], source, key, hit.get("config"), hit.get("times_ms", {}), note)
    modelled = {a: float(model_ms(a)) for a in candidates}
    if run is not None and tuning:
        times, best_config = {}, {}
        for algo in sorted(candidates, key=modelled.get):
            for config in (configs(algo) if configs else None) or [None]:
                best = min(times.values(), default=math.inf)
                fn = (lambda: run(algo)) if config is None else (lambda: run(algo, config))
                try:
                    ms = time_ms(fn, device, budget_ms=3 * best)
                except Exception as e:  # a config the device cannot launch loses, loudly
                    warnings.warn(f"lk3d autotune: {op} {algo} {config or ''} failed while "
                                  f"being measured and is skipped: {type(e).__name__}: {e}",
                                  RuntimeWarning)
                    continue
                if ms < times.get(algo, math.inf):
                    times[algo], best_config[algo] = ms, config
        if not times:
            raise RuntimeError(f"lk3d autotune: every candidate of {op} failed ({key})")
        algo = min(times, key=times.get)
        cfg = best_config[algo]
        cache.put(fid, key, space, {"algo": algo, "config": cfg, "times_ms": times,
                                    "source": "measured", "op": op})
        return Plan(algo, "measured", key, cfg, times, note)
    algo = min(modelled, key=modelled.get)
    return Plan(algo, "model", key, None, modelled, note)


def plan(op: str, key, device: torch.device, problem: Sequence,
         run: Optional[Callable] = None, preferred: Optional[str] = None,
         forced: Optional[tuple[str, str]] = None, only: bool = False) -> Plan:
    """The plan for ``problem`` of ``op``, chosen among the algorithms registered for it
    (``lk3d.autotune.registry``): the candidates are those that can run it here, the model their
    cost models, the configs measured theirs; ``run``, ``preferred``, ``forced`` and the rest as
    ``choose``. ``key``: the problem key, or the arguments of ``cache.problem_key`` after the op
    (``(dtype, x_shape, w_shape, stride, padding, dilation, groups)``, then any strings to append).
    ``only``: a problem only one algorithm can run gets it without further ado (source "only").
    """
    algos = registry.algorithms(op)
    key = key if isinstance(key, str) else problem_key(op, *key[:7]) + "".join(key[7:])
    candidates = [a.name for a in algos if a.can_run(*problem)]
    if only and len(candidates) == 1:
        return Plan(candidates[0], "only", key)

    def model(name):
        return registry.get(op, name).cost_ms(*problem)

    def configs(name):
        found = registry.get(op, name)
        return found.configs(*problem) if found.configs is not None else None

    return choose(op, key, device, candidates, model, run,
                  tuple(k for a in algos for k in a.spaces), preferred, configs=configs,
                  forced=forced)


def execute(op: str, key, device: torch.device, problem: Sequence, args: Sequence,
            preferred: Optional[str] = None, forced: Optional[tuple[str, str]] = None,
            only: bool = False):
    """Plan ``problem`` of ``op`` (as ``plan``) and run the plan: the chosen algorithm's runner on
    ``args``, with the plan's launch config as ``config=`` for an algorithm that launches (where
    the plan has none: the default config of the algorithm's ``config_problem``, else None). What an op's pass calls, once, to be planned and run; measuring runs the
    candidates the same way."""
    def run(algo, config=None):
        runner = registry.get(op, algo).run
        return runner(*args) if config is None else runner(*args, config=config)

    chosen = plan(op, key, device, problem, run, preferred, forced, only)
    found = registry.get(op, chosen.algo)
    config = chosen.config if found.launches else None
    if found.launches and config is None and found.config_problem is not None:
        main = problem[0]  # the operands' element size sizes the shared-memory estimate
        size = main.element_size() if isinstance(main, torch.Tensor) else 4
        config = config_spaces.default_config(found.config_problem(*problem), device, size)
    return run(chosen.algo, config)
