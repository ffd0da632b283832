"""The one timing module (lk3d.autotune.timing) that the planner and every benchmark use: each
entry point calls the callable and returns a positive finite time, and checks its arguments.
Nothing here asserts how fast anything is."""
import math
import time

import pytest
import torch

from lk3d.autotune import select, timing


def _counted(device):
    """A small matmul on ``device`` and the list its calls are counted in."""
    calls = []
    x = torch.randn(37, 37, device=device)

    def fn():
        calls.append(1)
        return x @ x

    return fn, calls


def test_the_planner_and_the_dispatch_benchmark_use_it():
    from lk3d.tools import bench_dispatch
    assert select.time_ms is timing.time_ms
    assert bench_dispatch.time_ms is timing.time_ms
    assert bench_dispatch.paired_ratio is timing.paired_ratio


@pytest.mark.parametrize("measure", [
    lambda fn, device: timing.call_s(fn, device),
    lambda fn, device: timing.repeat_ms(fn, device, 0.01),
    lambda fn, device: timing.repeat_ms(fn, device, 0.01, stat="min", warmup_ms=0),
    lambda fn, device: timing.time_ms(fn, device),
    lambda fn, device: timing.time_ms(fn, str(device), budget_ms=0.0),
], ids=["call_s", "repeat_ms-median", "repeat_ms-min", "time_ms", "time_ms-budget0"])
def test_a_positive_finite_time_of_the_callable(device, measure):
    fn, calls = _counted(device)
    t = measure(fn, device)
    assert isinstance(t, float) and math.isfinite(t) and t > 0
    assert calls


def test_time_ms_stops_after_a_first_call_over_the_budget(device):
    fn, calls = _counted(device)
    assert timing.time_ms(fn, device, budget_ms=0.0) > 0
    assert len(calls) == 1  # the candidate has lost: no repetitions


def test_paired_ratio():
    ratio = timing.paired_ratio(lambda: time.sleep(0.004), lambda: time.sleep(0.001),
                                torch.device("cpu"), pairs=7)
    assert 2 < ratio < 6  # 4 ms over 1 ms, give or take a sleep's overshoot


def test_paired_ratio_alternates_the_order():
    calls = []
    timing.paired_ratio(lambda: calls.append("a"), lambda: calls.append("b"), "cpu", pairs=4)
    assert calls[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # after one warm-up pair


def _noop():
    return None


BAD_VALUES = [
    (lambda: timing.repeat_ms(_noop, "cpu", 0), "min_run_time"),
    (lambda: timing.repeat_ms(_noop, "cpu", -0.1), "min_run_time"),
    (lambda: timing.repeat_ms(_noop, "cpu", math.nan), "min_run_time"),
    (lambda: timing.repeat_ms(_noop, "cpu", math.inf), "min_run_time"),
    (lambda: timing.repeat_ms(_noop, "cpu", "0.1"), "min_run_time"),
    (lambda: timing.repeat_ms(_noop, "cpu", 0.01, stat="mean"), "stat"),
    (lambda: timing.repeat_ms(_noop, "cpu", 0.01, warmup_ms=-1), "warmup_ms"),
    (lambda: timing.repeat_ms(_noop, "no-such-device", 0.01), "device"),
    (lambda: timing.time_ms(_noop, "cpu", budget_ms=-1.0), "budget_ms"),
    (lambda: timing.time_ms(_noop, "cpu", budget_ms=math.nan), "budget_ms"),
    (lambda: timing.call_s(_noop, 3.5), "device"),
    (lambda: timing.paired_ratio(_noop, _noop, "cpu", pairs=0), "pairs"),
    (lambda: timing.paired_ratio(_noop, _noop, "cpu", pairs=2.0), "pairs"),
    (lambda: timing.paired_ratio(_noop, _noop, "cpu", pairs=True), "pairs"),
    (lambda: timing.paired_ratio(_noop, _noop, "cpu", min_s=0), "min_s"),
]


@pytest.mark.parametrize("call, name", BAD_VALUES,
                         ids=[f"{name}-{i}" for i, (_, name) in enumerate(BAD_VALUES)])
def test_bad_arguments_raise_value_error_naming_them(call, name):
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        call()


@pytest.mark.parametrize("call, name", [
    (lambda: timing.call_s(None, "cpu"), "fn"),
    (lambda: timing.repeat_ms(3, "cpu", 0.01), "fn"),
    (lambda: timing.time_ms("fn", "cpu"), "fn"),
    (lambda: timing.paired_ratio(_noop, 1, "cpu"), "fn_b"),
], ids=["call_s", "repeat_ms", "time_ms", "paired_ratio"])
def test_a_callable_that_is_not_one_raises_type_error(call, name):
    with pytest.raises(TypeError, match=f"^{name}: expected a callable"):
        call()
