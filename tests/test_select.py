"""Algorithm choice (lk3d.autotune.select): forced, preferred, cached, measured, modelled.

``select.choose`` is driven with fake timings (``select.time_ms`` patched) so measuring is
instant and its winner known; then the same through ``lk3d.conv3d``/``lk3d.explain`` with the
Triton kernels taken out of the candidates (no interpreted kernel is timed), under
``torch.compile`` too, and the cost model on a few problems. Every test has its own plan cache.
"""
import json
import math
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

import lk3d
from _cases import TOL, Case, rel_err
from lk3d import _algos, _conv_ops
from lk3d.autotune import cache, registry, select
from lk3d.autotune.cache import PlanCache, default_cache, problem_key
from lk3d.autotune.fingerprint import device_fingerprint, fingerprint_id
from lk3d.kernels import INTERPRETED

CPU = torch.device("cpu")
CANDS = ["tiled", "fft", "aten"]
KEY = problem_key("conv3d", torch.float32, (1, 8, 32, 32, 32), (8, 8, 9, 9, 9), 1, [4] * 6, 1, 1)
MODEL_MS = {"tiled": 0.5, "fft": 9.0, "aten": 4.0}    # the model's favourite is tiled ...
MEASURED_MS = {"tiled": 3.0, "fft": 1.0, "aten": 2.0}  # ... the measured best is fft


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A fresh plan cache per test, no seed plans, no forcing or tuning from the environment."""
    monkeypatch.setenv("LK3D_CACHE_DIR", str(tmp_path / "plans"))
    monkeypatch.setattr(cache, "_seed_entries", dict)
    monkeypatch.delenv("LK3D_ALGO", raising=False)
    monkeypatch.delenv("LK3D_AUTOTUNE", raising=False)
    monkeypatch.setattr(select, "_forced_warned", set())  # the once-per-process LK3D_ALGO warnings


@pytest.fixture
def fake_timer(monkeypatch):
    """``run(algo)`` records the algorithm; ``select.time_ms`` runs it and returns MEASURED_MS."""
    ran = []

    def run(algo):
        ran.append(algo)
        return algo

    def time_ms(fn, device, budget_ms=math.inf):
        return MEASURED_MS[fn()]

    monkeypatch.setattr(select, "time_ms", time_ms)
    return run, ran


@pytest.fixture
def no_kernels(monkeypatch):
    """The Triton kernels out of the candidates (fft and aten remain): nothing slow is timed."""
    monkeypatch.setattr(_algos, "kernels_can_run", lambda t: False)     # candidates()
    monkeypatch.setattr(_conv_ops, "kernels_can_run", lambda t: False)  # the bias gradient


def _choose(run, candidates=CANDS, preferred=None, key=KEY):
    return select.choose("conv3d", key, CPU, candidates, model_ms=lambda a: MODEL_MS[a], run=run,
                         kernels=(), preferred=preferred)


def _fid():
    return fingerprint_id(device_fingerprint(CPU))


# ---------------------------------------------------------------------------------------------
# select.choose
# ---------------------------------------------------------------------------------------------

def test_measured_best_wins_and_is_cached(fake_timer, tmp_path, monkeypatch):
    run, ran = fake_timer
    with select.tune():
        plan = _choose(run)
    assert (plan.algo, plan.source) == ("fft", "measured")
    assert plan.times_ms == MEASURED_MS and sorted(ran) == sorted(CANDS)

    ran.clear()
    again = _choose(run)  # outside tune(): from the cache, nothing run
    assert (again.algo, again.source, again.times_ms) == ("fft", "cache", MEASURED_MS)
    with select.tune():
        assert _choose(run).source == "cache"
    assert ran == []

    stored = PlanCache(tmp_path / "plans").get(_fid(), KEY, select.space_of(CANDS, ()))
    assert stored["algo"] == "fft" and stored["source"] == "measured"
    old = default_cache()
    monkeypatch.setenv("LK3D_CACHE_DIR", str(tmp_path / "plans") + "/")  # same dir, new object
    assert default_cache() is not old
    assert (_choose(run).algo, _choose(run).source) == ("fft", "cache")
    # another candidate list is another config space: a miss, modelled
    assert _choose(run, candidates=["fft", "aten"]).source == "model"
    assert ran == []


def test_model_without_tuning(fake_timer):
    run, ran = fake_timer
    plan = _choose(run)
    assert (plan.algo, plan.source, plan.times_ms) == ("tiled", "model", MODEL_MS)
    assert ran == []
    assert default_cache().entries() == 0, "modelled plans are not stored"
    assert select.measuring() is False


def test_autotune_env_measures_without_context(fake_timer, monkeypatch):
    run, ran = fake_timer
    monkeypatch.setenv("LK3D_AUTOTUNE", "1")
    assert select.measuring() is True
    plan = _choose(run)
    assert (plan.algo, plan.source) == ("fft", "measured")
    assert sorted(ran) == sorted(CANDS)


def test_autotune_off_wins_over_tune(fake_timer, monkeypatch):
    run, ran = fake_timer
    monkeypatch.setenv("LK3D_AUTOTUNE", "0")
    with select.tune():
        assert select.measuring() is False
        plan = _choose(run)
    assert (plan.algo, plan.source) == ("tiled", "model")
    assert ran == []


def test_tune_nests_and_ends():
    assert not select.measuring()
    with select.tune():
        with select.tune():
            assert select.measuring()
        assert select.measuring()
    assert not select.measuring()


@pytest.mark.parametrize("var,value", [("LK3D_AUTOTUNE", "yes"), ("LK3D_AUTOTUNE", "2"),
                                       ("LK3D_ALGO", "cudnn"), ("LK3D_ALGO", "triton")])
def test_bad_environment_raises(var, value, fake_timer, no_kernels, monkeypatch):
    run, ran = fake_timer
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=var):
        _choose(run)
    assert ran == []
    x, w = torch.randn(1, 2, 5, 5, 5), torch.randn(2, 2, 3, 3, 3)
    with pytest.raises(ValueError, match=var):  # on a cache miss, where measuring is decided
        lk3d.conv3d(x, w)


@pytest.mark.parametrize("value,want", [("fft", "fft"), (" FFT ", "fft"), ("aten", "aten"),
                                        ("auto", None), ("", None)])
def test_forced_algo_parsing(value, want, monkeypatch):
    monkeypatch.setenv("LK3D_ALGO", value)
    assert select.forced_algo() == want


def test_forced(fake_timer, monkeypatch):
    run, ran = fake_timer
    monkeypatch.setenv("LK3D_ALGO", "fft")
    with select.tune():
        plan = _choose(run, preferred="tiled")
    assert (plan.algo, plan.source) == ("fft", "forced")
    assert ran == [] and default_cache().entries() == 0


def test_forced_algo_that_cannot_run_falls_through(fake_timer, monkeypatch):
    run, ran = fake_timer
    monkeypatch.setenv("LK3D_ALGO", "tiled")
    with pytest.warns(RuntimeWarning, match="LK3D_ALGO=tiled cannot run here"):
        plan = _choose(run, candidates=["fft", "aten"])
    assert (plan.algo, plan.source) == ("aten", "model")
    assert "LK3D_ALGO" in plan.note and "tiled" in plan.note
    with select.tune():
        plan = _choose(run, candidates=["fft", "aten"])
    assert (plan.algo, plan.source) == ("fft", "measured")
    assert "LK3D_ALGO" in plan.note
    assert sorted(ran) == ["aten", "fft"]


def _recorded(fn):
    """``fn()``'s RuntimeWarnings, every one (no de-duplication by Python's registry)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]


def test_forced_algo_that_cannot_run_warns_once(fake_timer, monkeypatch):
    """Once per (algorithm, reason) in a process, naming both; the plan keeps the note."""
    from lk3d import kernels

    monkeypatch.setattr(kernels, "INTERPRETED", False)
    run, _ = fake_timer
    monkeypatch.setenv("LK3D_ALGO", "tiled")
    other = problem_key("conv3d", torch.float32, (1, 3, 5, 5, 5), (3, 3, 3, 3, 3), 1, [1] * 6, 1,
                        1)
    found = _recorded(lambda: [_choose(run, candidates=["fft", "aten"], key=k)
                               for k in (KEY, KEY, other)])
    assert len(found) == 1, found
    assert found[0].startswith("LK3D_ALGO=tiled cannot run here: tiled needs Triton on CUDA, "
                               "or its interpreter (TRITON_INTERPRET=1)"), found
    assert _recorded(lambda: _choose(run, candidates=["fft", "aten"])) == []
    monkeypatch.setenv("LK3D_ALGO", "fft")  # another algorithm, another reason: one more
    found = _recorded(lambda: [_choose(run, candidates=["tiled", "aten"]) for _ in range(2)])
    assert found == ["LK3D_ALGO=fft cannot run here: conv3d on cpu chooses among tiled, aten "
                     "only; the algorithm is chosen as if it were unset (said once per process)"]
    assert "chooses among tiled, aten" in _choose(run, candidates=["tiled", "aten"]).note


def test_forced_tiled_on_a_dtype_the_kernels_do_not_take_warns_once(monkeypatch):
    """Through lk3d.conv3d: bf16 on the CPU never runs the kernels; forward and both gradients
    give one warning, and the result is F.conv3d's."""
    from lk3d import kernels

    monkeypatch.setenv("LK3D_ALGO", "tiled")
    x = torch.randn(1, 2, 5, 6, 7, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    out = []
    found = _recorded(lambda: out.append(lk3d.conv3d(x, w, padding=1)) or
                      out[0].backward(torch.ones_like(out[0])))
    assert len(found) == 1 and found[0].startswith("LK3D_ALGO=tiled cannot run here: "), found
    assert ("do not take this dtype on cpu" if kernels.INTERPRETED else "TRITON_INTERPRET=1") \
        in found[0]
    ref = F.conv3d(x.detach().double(), w.detach().double(), padding=1)
    assert rel_err(out[0], ref) < TOL[torch.bfloat16]
    assert x.grad is not None and w.grad is not None


def test_preferred_wins_over_model_and_cache(fake_timer, monkeypatch):
    run, ran = fake_timer
    default_cache().put(_fid(), KEY, select.space_of(CANDS, ()),
                        {"algo": "aten", "config": None, "times_ms": {}, "source": "measured"})
    assert _choose(run).algo == "aten"                 # the cached plan
    with select.tune():
        plan = _choose(run, preferred="fft")
    assert (plan.algo, plan.source) == ("fft", "model")
    assert ran == []
    assert _choose(run, candidates=["tiled", "aten"], preferred="fft").algo == "tiled"  # can't run
    monkeypatch.setenv("LK3D_ALGO", "aten")
    assert _choose(run, preferred="fft").source == "forced"
    assert _choose(run, preferred="fft").algo == "aten"


def test_time_ms_median_and_budget():
    calls = []
    x = torch.randn(64, 64)

    def fn():
        calls.append(1)
        return x @ x

    ms = select.time_ms(fn, CPU, budget_ms=0.0)  # the first run already lost: no repeats
    assert ms > 0 and len(calls) == 1
    ms = select.time_ms(fn, CPU)
    assert 0 < ms < 1000 and len(calls) > 2


# ---------------------------------------------------------------------------------------------
# through lk3d.conv3d / lk3d.explain
# ---------------------------------------------------------------------------------------------

SMALL = Case(2, 3, 4, (6, 5, 7), (3, 3, 3), padding=1)


def test_explain_plans():
    x, w, b = SMALL.tensors(dtype=torch.float32)
    plans = lk3d.explain(x, w, b, **SMALL.args())
    assert set(plans) == {"forward", "grad_input", "grad_weight"}
    for name, op in (("forward", "conv3d|"), ("grad_input", "conv3d_grad_input|"),
                     ("grad_weight", "conv3d_grad_weight|")):
        p = plans[name]
        assert {"algo", "source", "key", "config", "times_ms"} <= set(p)
        assert p["key"].startswith(op) and "float32" in p["key"]
        assert p["algo"] in select.ALGOS


def test_explain_prints_a_table_and_stays_a_dict(no_kernels):
    x, w, b = SMALL.tensors(dtype=torch.float32)
    plans = lk3d.explain(x, w, b, **SMALL.args())
    assert isinstance(plans, dict) and plans == dict(plans)
    lines = repr(plans).splitlines()
    assert str(plans) == repr(plans)
    assert lines[0] == (f"lk3d.conv3d on cpu, float32: input {tuple(x.shape)}, weight "
                        f"{tuple(w.shape)}, stride 1, padding 1, dilation 1, groups 1")
    assert lines[1].split() == ["pass", "algo", "source", "config", "fft", "ms", "aten", "ms"]
    assert [line.split()[:3] for line in lines[3:]] == [
        [name, p["algo"], "model"] for name, p in plans.items()] + [["ms:", "measured", "where"]]
    assert pickle.loads(pickle.dumps(plans)).title == plans.title
    assert json.loads(json.dumps(plans)) == plans
    # a cached plan with a launch config and a note, as the table shows them
    cached = {"algo": "tiled", "source": "cache", "config": {"BLOCK_M": 64, "num_warps": 4},
              "times_ms": {"tiled": 0.25, "aten": 1234.5}, "note": "n"}
    forced = {"algo": "aten", "source": "forced", "config": None, "times_ms": {}, "note": ""}
    assert repr(select.Plans({"forward": cached, "grad_input": forced})).splitlines() == [
        "pass        algo   source  config                  tiled ms  aten ms  note",
        "----------  -----  ------  ----------------------  --------  -------  ----",
        "forward     tiled  cache   BLOCK_M=64 num_warps=4      0.25   1234.5  n",
        "grad_input  aten   forced  -                              -        -",
        "ms: measured where the source is measured, cache or seed; modelled where it is model"]


@pytest.mark.skipif(not INTERPRETED, reason="needs the Triton interpreter (TRITON_INTERPRET=1)")
def test_explain_interpreter_prefers_tiled(monkeypatch):
    x, w, b = SMALL.tensors(dtype=torch.float32)
    plans = lk3d.explain(x, w, b, **SMALL.args())
    assert {p["algo"] for p in plans.values()} == {"tiled"}
    assert {p["source"] for p in plans.values()} == {"model"}
    monkeypatch.setenv("LK3D_ALGO", "aten")
    plans = lk3d.explain(x, w, b, **SMALL.args())
    assert {(p["algo"], p["source"]) for p in plans.values()} == {("aten", "forced")}


@pytest.fixture
def fft_measures_faster(monkeypatch):
    """Every runner records its algorithm; time_ms says fft 1 ms, aten 5 ms."""
    last = []
    for op in ("conv3d", "conv3d_grad_input", "conv3d_grad_weight"):
        for entry in registry.algorithms(op):
            def recorded(*args, _algo=entry.name, _fn=entry.run, **kwargs):
                last.append(_algo)
                return _fn(*args, **kwargs)
            monkeypatch.setattr(entry, "run", recorded)

    def time_ms(fn, device, budget_ms=math.inf):
        fn()
        return {"fft": 1.0, "aten": 5.0}[last[-1]]

    monkeypatch.setattr(select, "time_ms", time_ms)
    return last


def test_measured_dispatch_end_to_end(no_kernels, fft_measures_faster):
    x, w, b = SMALL.tensors(dtype=torch.float32)
    assert _algos.candidates(x) == ["fft", "aten"]
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    with select.tune():
        y = lk3d.conv3d(x, w, b, **SMALL.args())
        gy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [x, w, b], gy)
    assert set(fft_measures_faster) == {"fft", "aten"} and fft_measures_faster[-1] == "fft"
    ref = F.conv3d(x, w, b, **SMALL.args())
    assert rel_err(y, ref) < TOL[torch.float32]
    for got, want in zip(grads, torch.autograd.grad(ref, [x, w, b], gy)):
        assert rel_err(got, want) < TOL[torch.float32]
    plans = lk3d.explain(x, w, b, **SMALL.args())
    for p in plans.values():
        assert (p["algo"], p["source"]) == ("fft", "cache")
        assert p["times_ms"] == {"fft": 1.0, "aten": 5.0}
    assert default_cache().entries() == 3


def test_compile_fullgraph_with_autotune(no_kernels, monkeypatch):
    """Measuring happens where the op runs, not while it is traced: no graph break."""
    monkeypatch.setenv("LK3D_AUTOTUNE", "1")
    torch._dynamo.reset()
    x, w, b = SMALL.tensors()
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()

    def f(x, w, b):
        return torch.tanh(lk3d.conv3d(x, w, b, **SMALL.args())) * 2

    info = torch._dynamo.explain(f)(x, w, b)
    assert info.graph_break_count == 0 and info.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    y_comp = compiled(x, w, b)
    gy = torch.randn_like(y_comp)
    g_comp = torch.autograd.grad(y_comp, [x, w, b], gy)
    assert default_cache().entries() == 3, "forward, grad-input and grad-weight were measured"
    y_eager = f(x, w, b)
    g_eager = torch.autograd.grad(y_eager, [x, w, b], gy)
    assert rel_err(y_comp, y_eager) < 1e-10
    for got, want in zip(g_comp, g_eager):
        assert rel_err(got, want) < 1e-10
    assert rel_err(y_eager, torch.tanh(F.conv3d(x, w, b, **SMALL.args())) * 2) < 1e-10
    plans = lk3d.explain(x, w, b, **SMALL.args())
    assert {p["source"] for p in plans.values()} == {"cache"}
    assert {p["algo"] for p in plans.values()} <= {"fft", "aten"}
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# the cost model
# ---------------------------------------------------------------------------------------------

def _model(algo, k, groups=1, cin=16, cout=16):
    return _algos.model_ms(algo, [1, cin, 48, 48, 48], [cout, cin // groups, k, k, k], [1, 1, 1],
                           [k // 2] * 6, [1, 1, 1], groups, torch.float32, CPU)


def test_cost_model_cpu():
    assert _model("fft", 21) < _model("aten", 21)
    assert _model("aten", 3) < _model("fft", 3)
    assert _model("tiled", 21) == math.inf and _model("tiled", 3) == math.inf
    for k in (3, 21):
        assert 0 < _model("fft", k) < math.inf and 0 < _model("aten", k) < math.inf
    assert _model("aten", 3) < _model("aten", 21)


def test_a_failing_candidate_is_skipped_with_a_warning(tmp_path, monkeypatch):
    """A launch config that fails while measured (say, out of shared memory) loses; the others
    are still compared."""
    monkeypatch.setenv("LK3D_CACHE_DIR", str(tmp_path))
    from lk3d.autotune import select as sel

    def run(algo, config=None):
        if config == {"BLOCK": 2}:
            raise RuntimeError("out of resources")
        return algo, None if config is None else config["BLOCK"]

    fake_ms = {("aten", None): 5.0, ("fft", None): 3.0, ("tiled", 1): 4.0}
    monkeypatch.setattr(sel, "time_ms", lambda fn, device, budget_ms=None: fake_ms[fn()])
    with sel.tune(), pytest.warns(RuntimeWarning, match="out of resources"):
        plan = sel.choose("conv3d", "k-fail", torch.device("cpu"), ["tiled", "fft", "aten"],
                          lambda a: 1.0, run,
                          configs=lambda a: [{"BLOCK": 1}, {"BLOCK": 2}] if a == "tiled" else None)
    assert plan.algo == "fft" and plan.source == "measured"
    assert plan.times_ms == {"tiled": 4.0, "fft": 3.0, "aten": 5.0}
