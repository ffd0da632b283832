"""The timing of every measurement: the planner's (``lk3d.autotune.select``) and the tools'
(``lk3d bench``, ``lk3d bench --dispatch``, ``lk3d tune``, the roofline ceilings).

CUDA: ``triton.testing.do_bench``, imported on first use (importing this module loads neither
Triton nor ``torch.utils.benchmark``); the CPU: ``torch.utils.benchmark.Timer.blocked_autorange``
with all of torch's threads. Other device types are timed as the CPU is, without a device wait.

    call_s(fn, device)                      seconds of one call, from a synchronised start to a
                                            synchronised end
    repeat_ms(fn, device, min_run_time,     milliseconds over about ``min_run_time`` seconds of
              stat="median", warmup_ms=25)  repetitions: their median, or the fastest ("min")
    time_ms(fn, device, budget_ms=inf)      the planner's measurement: one call, then
                                            ``repeat_ms``'s median unless that call already
                                            took longer than ``budget_ms``
    paired_ratio(fn_a, fn_b, device)        the median of time(a) / time(b) over back-to-back
                                            pairs of single calls
"""
import math
import statistics
import time
from numbers import Real
from typing import Callable, Optional

import torch

STATS = ("median", "min")
# The planner's repetitions: do_bench's own defaults on CUDA (25 ms of warm-up, 100 ms of
# repetitions); on the CPU 5 first calls' worth, within [0.05 s, 1 s].
_CUDA_RUN_TIME_S = 0.1
_CPU_RUN_TIME_S = (0.05, 1.0)
# A first CPU call this long is its own measurement: repetitions would add seconds for little.
# (Not on CUDA: there the first call includes Triton's compile.)
_CPU_ONE_CALL_MS = 2000.0


def _check_fn(name: str, fn) -> None:
    if not callable(fn):
        raise TypeError(f"{name}: expected a callable, got {type(fn).__name__}")


def _check_device(device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected a torch.device or a device name such as 'cpu' or "
                         f"'cuda', got {device!r}") from e


def _check_number(name: str, value, what: str, *, zero_ok: bool = False,
                  inf_ok: bool = False) -> None:
    """``value`` is a real number > 0 (>= 0 with ``zero_ok``), finite unless ``inf_ok``; else a
    ValueError naming ``name`` and saying ``what`` was expected."""
    ok = (isinstance(value, Real) and not isinstance(value, bool)
          and (value >= 0 if zero_ok else value > 0) and (inf_ok or math.isfinite(value)))
    if not ok:
        raise ValueError(f"{name}: expected {what}, got {value!r}")


def sync(device) -> None:
    """Wait for ``device``'s queued work (nothing to wait for on the CPU)."""
    device = _check_device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_s(fn: Callable[[], object], device) -> float:
    """Seconds of one call of ``fn()``, from a synchronised start to a synchronised end."""
    _check_fn("fn", fn)
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def repeat_ms(fn: Callable[[], object], device, min_run_time: float, stat: str = "median",
              warmup_ms: float = 25) -> float:
    """Milliseconds of ``fn()`` over about ``min_run_time`` seconds of repetitions: their median,
    or with ``stat="min"`` the fastest (a ceiling is the best a machine does). CUDA: ``do_bench``
    with ``warmup_ms`` of warm-up first; CPU: ``blocked_autorange``'s blocks (one call each where
    a call takes more than ``min_run_time / 1000``; its first call sizes the blocks and is not
    counted)."""
    _check_fn("fn", fn)
    device = _check_device(device)
    _check_number("min_run_time", min_run_time, "a finite number of seconds > 0")
    if stat not in STATS:
        raise ValueError(f"stat: expected one of {STATS}, got {stat!r}")
    _check_number("warmup_ms", warmup_ms, "a finite number of milliseconds >= 0",
                  zero_ok=True)
    if device.type == "cuda":
        import triton.testing

        sync(device)
        return float(triton.testing.do_bench(fn, warmup=warmup_ms,
                                             rep=max(1, int(min_run_time * 1e3)),
                                             return_mode=stat))
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measured = timer.blocked_autorange(min_run_time=min_run_time)
    return (measured.median if stat == "median" else min(measured.times)) * 1e3


def time_ms(fn: Callable[[], object], device, budget_ms: float = math.inf) -> float:
    """The planner's measurement: median milliseconds of ``fn()``. A first call that already
    takes longer than ``budget_ms`` is returned as it is (no repeats for a candidate that has
    lost), as is a first CPU call of over 2 s; the repetitions last 0.1 s on CUDA and five first
    calls' worth on the CPU (0.05 s to 1 s)."""
    _check_fn("fn", fn)
    device = _check_device(device)
    _check_number("budget_ms", budget_ms, "a number of milliseconds >= 0 (or inf)",
                  zero_ok=True, inf_ok=True)
    first = call_s(fn, device) * 1e3
    if device.type == "cuda":
        if first > budget_ms:
            return first
        return repeat_ms(fn, device, _CUDA_RUN_TIME_S)
    if first > min(budget_ms, _CPU_ONE_CALL_MS):
        return first
    low, high = _CPU_RUN_TIME_S
    return repeat_ms(fn, device, min(high, max(low, 5 * first / 1e3)))


def paired_ratio(fn_a: Callable[[], object], fn_b: Callable[[], object], device,
                 pairs: Optional[int] = None, min_s: float = 1.0) -> float:
    """Median over pairs of back-to-back single calls of time(a) / time(b): drift of a shared
    machine hits both calls of a pair alike, which separately timed rounds cannot give (those
    differ by up to +-30% on a shared 2-core machine). ``pairs`` pairs; None: at least 5 and up
    to 200 within ``min_s`` seconds. One warm-up pair first. The order alternates (a b, b a, a b,
    ...): the first call of a pair was measured ~5% faster than the same code run second."""
    _check_fn("fn_a", fn_a)
    _check_fn("fn_b", fn_b)
    device = _check_device(device)
    if pairs is not None and (isinstance(pairs, bool) or not isinstance(pairs, int)
                              or pairs < 1):
        raise ValueError(f"pairs: expected None or an int >= 1, got {pairs!r}")
    _check_number("min_s", min_s, "a finite number of seconds > 0")
    fn_a(), fn_b()
    ratios, start = [], time.perf_counter()
    while True:
        if pairs is not None:
            if len(ratios) >= pairs:
                break
        elif len(ratios) >= 5 and (len(ratios) >= 200 or time.perf_counter() - start >= min_s):
            break
        order = (("a", fn_a), ("b", fn_b))[::1 if len(ratios) % 2 == 0 else -1]
        seconds = {name: call_s(fn, device) for name, fn in order}
        ratios.append(seconds["a"] / seconds["b"])
    return statistics.median(ratios)
