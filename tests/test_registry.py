"""The algorithm registry (lk3d.autotune.registry) and the planner's use of it (``select.plan``):
candidates from "can run here", the model from the cost models, the space hash from the config
spaces registered with lk3d.autotune.configs, also where Triton does not import.

A toy op is registered into a copy of the registry, so nothing registered here outlives its test.
"""
import json
import math
import subprocess
import sys

import pytest
import torch

from _cases import TOL
from lk3d import _algos
from lk3d.autotune import cache, registry, select
from lk3d.autotune.cache import PlanCache
from lk3d.autotune.fingerprint import device_id

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A fresh plan cache, no seed plans, no forcing or tuning from the environment, and a
    registry whose additions end with the test."""
    monkeypatch.setenv("LK3D_CACHE_DIR", str(tmp_path / "plans"))
    monkeypatch.setattr(cache, "_seed_entries", dict)
    monkeypatch.delenv("LK3D_ALGO", raising=False)
    monkeypatch.delenv("LK3D_AUTOTUNE", raising=False)
    monkeypatch.setattr(select, "_forced_warned", set())
    monkeypatch.setattr(registry, "_OPS", dict(registry._OPS))


def _toy(ran):
    """Op "toy" (problem: one int n): "slow" (5n ms), "fast" (n ms, over the conv3d_dw space) and
    "absent" (0 ms, never runs here, with its own reason)."""
    def algo(name, ms, can=True, **kw):
        return registry.Algorithm("toy", name, lambda: ran.append(name) or name,
                                  lambda n: can, lambda n: ms * n, **kw)
    registry.register(algo("slow", 5.0))
    registry.register(algo("fast", 1.0, spaces=("conv3d_dw",), launches=True))
    registry.register(algo("absent", 0.0, can=False, why_not=lambda device: "toy reason"))


def test_plan_from_the_registered_algorithms(tmp_path, monkeypatch):
    ran = []
    _toy(ran)
    assert [a.name for a in registry.algorithms("toy")] == ["slow", "fast", "absent"]
    assert {"slow", "fast", "absent"} <= set(select.ALGOS)
    plan = select.plan("toy", "k1", CPU, (3,))
    assert (plan.algo, plan.source, plan.times_ms) == ("fast", "model",
                                                       {"slow": 15.0, "fast": 3.0})
    assert ran == []
    # measured: fast's time wins again; the plan is stored under the registered spaces' hash
    monkeypatch.setattr(select, "time_ms", lambda fn, device, budget_ms=math.inf:
                        {"slow": 2.0, "fast": 1.0}[fn()])
    with select.tune():
        plan = select.plan("toy", "k2", CPU, (3,), run=lambda name: registry.get("toy", name).run())
    assert (plan.algo, plan.source) == ("fast", "measured") and sorted(ran) == ["fast", "slow"]
    space = select.space_of(["slow", "fast"], ("conv3d_dw",))
    assert space != select.space_of(["slow", "fast"], ())
    stored = PlanCache(tmp_path / "plans").get(device_id(CPU), "k2", space)
    assert stored["algo"] == "fast" and stored["times_ms"] == {"slow": 2.0, "fast": 1.0}
    assert repr(select.Plans({"p": plan.as_dict()})).splitlines()[2].split()[:4] == [
        "p", "fast", "measured", "default"]  # no config named: an algorithm with launches


def test_forced_algorithm_that_cannot_run_gives_its_reason(monkeypatch):
    _toy([])
    monkeypatch.setenv("LK3D_ALGO", "absent")
    with pytest.warns(RuntimeWarning, match="LK3D_ALGO=absent cannot run here: toy reason"):
        plan = select.plan("toy", "k3", CPU, (1,))
    assert plan.algo == "fast" and "toy reason" in plan.note
    monkeypatch.setenv("LK3D_ALGO", "slow")
    plan = select.plan("toy", "k3", CPU, (1,))
    assert (plan.algo, plan.source) == ("slow", "forced")


def test_register_and_lookup_errors():
    entry = registry.get("conv3d", "fft")
    with pytest.raises(ValueError, match="conv3d already has an algorithm 'fft'"):
        registry.register(registry.Algorithm("conv3d", "fft", entry.run, entry.can_run,
                                             entry.cost_ms))
    assert registry.register(entry) is entry  # the same one again: nothing changes
    with pytest.raises(ValueError, match=r"algorithm: conv3d has \['tiled', 'fft', 'aten'\], "
                                         r"got 'winograd'"):
        registry.get("conv3d", "winograd")
    with pytest.raises(ValueError, match="op: expected one of .*'conv3d'.*, got 'conv2d'"):
        registry.algorithms("conv2d")
    assert registry.find("conv2d", "fft") is None


def test_runner_tables_read_through_the_registry(monkeypatch):
    assert list(_algos.FORWARD) == ["tiled", "fft", "aten"] and len(_algos.GRAD_WEIGHT) == 3
    assert _algos.GRAD_INPUT["fft"] is _algos.fft_grad_input

    def replaced(*args, **kwargs):
        return "replaced"
    monkeypatch.setattr(registry.get("conv3d", "aten"), "run", replaced)
    assert _algos.FORWARD["aten"] is replaced
    with pytest.raises(KeyError):
        _algos.FORWARD["winograd"]


# Without Triton (a None in sys.modules: its import raises ImportError) the config spaces still
# import, so plans keep the cache key they have with Triton; the convolution takes the torch paths.
NO_TRITON = """
import json, sys
sys.modules["triton"] = None
import torch, torch.nn.functional as F
import lk3d
from lk3d.autotune import select
x = torch.randn(1, 2, 5, 6, 7, dtype=torch.float64)
w = torch.randn(3, 2, 3, 1, 3, dtype=torch.float64)
ref = F.conv3d(x, w, padding=1)
err = (lk3d.conv3d(x, w, padding=1) - ref).norm() / ref.norm()
space = select.space_of(["fft", "aten"], ("conv3d_fwd", "conv3d_dw"))
print(json.dumps([lk3d.kernels.HAS_TRITON, space, err.item()]))
"""


def test_config_spaces_without_triton():
    proc = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    has_triton, space, err = json.loads(proc.stdout.splitlines()[-1])
    assert has_triton is False
    assert space == select.space_of(["fft", "aten"], ("conv3d_fwd", "conv3d_dw"))
    assert err < TOL[torch.float64]
