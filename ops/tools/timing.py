"""Timing for the tools' measurements: ``triton.testing.do_bench`` on CUDA,
``torch.utils.benchmark`` on the CPU (all torch threads)."""
import time

import torch


def sync(device):
    """Wait for ``device``'s queued work (a device or its type; nothing to wait for on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def first_call_s(fn, device) -> float:
    """Seconds of one call of ``fn()``, from a synchronised start to a synchronised end."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def repeat_ms(fn, device, min_run_time: float, stat: str = "median", warmup_ms: int = 25):
    """Milliseconds of ``fn()`` over about ``min_run_time`` seconds of repetitions: their median,
    or with ``stat="min"`` the fastest (a ceiling is the best a machine does). CUDA: ``do_bench``
    (``warmup_ms`` of warm-up first); CPU: ``blocked_autorange`` blocks."""
    if stat not in ("median", "min"):
        raise ValueError(f"stat: expected 'median' or 'min', got {stat!r}")
    if torch.device(device).type == "cuda":
        import triton.testing

        sync(device)
        return float(triton.testing.do_bench(fn, warmup=warmup_ms,
                                             rep=max(1, int(min_run_time * 1e3)),
                                             return_mode=stat))
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measured = timer.blocked_autorange(min_run_time=min_run_time)
    return (measured.median if stat == "median" else min(measured.times)) * 1e3
