"""The cache of packed weights (``lk3d.kernels.weight_cache``) behind the tensor-descriptor
launchers: repeated calls with an unchanged weight pack it once; an in-place update, a new tensor
at a reused address, inference tensors, meta tensors, ``LK3D_WEIGHT_CACHE=0`` and
``lk3d.clear_weight_cache`` all give a fresh pack; every result against a float64 reference.
fp32 kernels (TF32 off), every buffer a launcher allocates starting as NaN."""
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lk3d
from _cases import TOL, raises_naming, rel_err
from lk3d.kernels import common, weight_cache
from lk3d.tools import launch_record

pytest.importorskip("triton")

GRAD_TOL = 10 * TOL[torch.float32]
ARGS = dict(stride=(2, 1, 1), padding=(1, 1, 0))  # grad-input: two stride phases, two packs


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """An empty cache that is on, poisoned buffers, the Triton kernels for every pass."""
    monkeypatch.setattr(common, "POISON", True)
    monkeypatch.delenv(weight_cache.ENV, raising=False)
    monkeypatch.setenv("LK3D_ALGO", "tiled")
    lk3d.clear_weight_cache()
    yield
    lk3d.clear_weight_cache()


@pytest.fixture
def packs(monkeypatch):
    """A list that receives the weight shape of every ``pack`` the launchers make."""
    from lk3d.kernels import implicit_gemm

    calls, pack = [], implicit_gemm.pack

    def counting(w, groups, transpose=False):
        calls.append(tuple(w.shape))
        return pack(w, groups, transpose)
    monkeypatch.setattr(implicit_gemm, "pack", counting)
    return calls


def _inputs(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 5, 3, 4, dtype=torch.float64, generator=g)
    w = torch.randn(16, 16, 3, 2, 3, dtype=torch.float64, generator=g)
    return x.to(device=device, dtype=torch.float32), w.to(device=device, dtype=torch.float32)


def _check_step(x, w, gy=None):
    """lk3d.conv3d's output, and with ``gy`` its input and weight gradients, against float64."""
    xr, wr = (t.detach().double().cpu().requires_grad_() for t in (x, w))
    ref = F.conv3d(xr, wr, **ARGS)
    xg = x.detach().requires_grad_(gy is not None)
    y = lk3d.conv3d(xg, w, **ARGS)
    assert rel_err(y, ref) < TOL[torch.float32]
    if gy is not None:
        got = torch.autograd.grad(y, [xg, w], gy.to(y))
        for name, g, want in zip(("input", "weight"), got, torch.autograd.grad(ref, [xr, wr], gy)):
            assert rel_err(g, want) < GRAD_TOL, name


def test_repeat_hits_and_inplace_update_misses(device, no_tf32, packs):
    """A module-like weight (a Parameter) through lk3d.conv3d: the forward and the two grad-input
    phases pack it once each; a second step packs nothing; an optimizer step (an in-place update:
    a version bump) and ``w.add_`` repack, and the results follow the new values."""
    x, w = _inputs(device)
    w = torch.nn.Parameter(w)
    gy = torch.randn(1, 16, 3, 4, 2, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(1))
    _check_step(x, w, gy)
    assert len(packs) == 3 and weight_cache.size() == 3
    _check_step(x, w, gy)
    assert len(packs) == 3
    opt = torch.optim.SGD([w], lr=0.1)
    w.grad = torch.randn_like(w)
    opt.step()
    _check_step(x, w, gy)
    assert len(packs) == 6 and weight_cache.size() == 3  # the old version's copies dropped
    with torch.no_grad():
        w.add_(1.0)
    _check_step(x, w)
    assert len(packs) == 7


def test_new_tensor_at_a_reused_address(device, no_tf32, packs, monkeypatch):
    """A weight freed and a new one made over the same memory (same address, shape, strides and
    version 0, written without torch knowing): no hit, the new values are used. Its copy dies
    with the weight; and where every other part of the key matches (the identity forced equal),
    the weak reference tells the objects apart."""
    x, w = _inputs(device)
    if device.type != "cpu":
        pytest.skip("numpy memory: CPU tensors")
    memory = w.numpy().copy()
    for forced in (False, True):
        lk3d.clear_weight_cache()
        packs.clear()
        if forced:  # every weight the same id: only the weak reference separates them
            monkeypatch.setattr(weight_cache, "_key",
                                lambda t, spec: (0, t._version, t.data_ptr(), tuple(t.shape),
                                                 t.stride(), t.dtype, t.device, None, spec))
            monkeypatch.setattr(weight_cache, "_forget", lambda key: None)  # entries stay
        memory[:] = np.random.default_rng(2).standard_normal(memory.shape)
        first = torch.from_numpy(memory)
        address = first.data_ptr()
        _check_step(x, first)
        assert weight_cache.size() == 1
        del first
        assert weight_cache.size() == (1 if forced else 0)
        memory[:] = np.random.default_rng(3).standard_normal(memory.shape)
        second = torch.from_numpy(memory)
        assert second.data_ptr() == address and second._version == 0
        _check_step(x, second)
        assert len(packs) == 2


def test_inference_mode(device, no_tf32, packs):
    """Inference tensors keep no version counter: they bypass the cache and pack every call;
    a normal tensor updated in place inside inference mode still repacks."""
    x, w = _inputs(device)
    with torch.inference_mode():
        wi = w.clone()
        for _ in range(2):
            _check_step(x, wi)
        assert len(packs) == 2 and weight_cache.size() == 0
        _check_step(x, w)
        w.mul_(2.0)
        _check_step(x, w)
    assert len(packs) == 4


def test_switch_and_clear(device, no_tf32, packs, monkeypatch):
    """``LK3D_WEIGHT_CACHE=0`` packs every call and keeps nothing (a value other than 0 or 1 is
    refused, naming it); ``lk3d.clear_weight_cache``
    empties the cache (the remedy after a write through ``.data``, which no version counter
    sees)."""
    x, w = _inputs(device)
    monkeypatch.setenv(weight_cache.ENV, "0")
    _check_step(x, w)
    _check_step(x, w)
    assert len(packs) == 2 and weight_cache.size() == 0
    monkeypatch.setenv(weight_cache.ENV, "off")
    with raises_naming(ValueError, [weight_cache.ENV, "'0' or '1'", "'off'"]):
        lk3d.conv3d(x, w, **ARGS)
    monkeypatch.setenv(weight_cache.ENV, "1")
    _check_step(x, w)
    version = w._version
    w.data.mul_(-1.0)
    assert w._version == version  # the known limit: this write leaves the copy stale
    lk3d.clear_weight_cache()
    assert weight_cache.size() == 0
    _check_step(x, w)
    assert len(packs) == 4


def test_meta_tensors_bypass():
    """Recording launches on meta tensors (lk3d.tools.launch_record) keeps nothing."""
    conv = launch_record.Conv((1, 32, 9, 9, 9), (32, 32, 3, 3, 3), stride=2)
    for pass_ in ("forward", "grad_input"):
        launch_record.launches(conv, pass_, 90)
    assert weight_cache.size() == 0


def test_bounded_lru_and_threads():
    """At most CAPACITY copies, the least recently used out first; threads sharing the cache
    each get the copy of their own weight."""
    weights = [torch.full((2, 2), float(i)) for i in range(weight_cache.CAPACITY + 4)]
    for w in weights:
        weight_cache.get(w, ("t",), lambda w=w: w * 10)
    assert weight_cache.size() == weight_cache.CAPACITY
    made = []
    weight_cache.get(weights[0], ("t",), lambda: made.append(0) or weights[0] * 10)
    weight_cache.get(weights[-1], ("t",), lambda: made.append(1) or weights[-1] * 10)
    assert made == [0]  # the first was evicted, the last kept

    errors = []

    def work(k):
        for i in range(200):
            w = weights[(i * 7 + k) % len(weights)]
            got = weight_cache.get(w, ("t",), lambda w=w: w * 10)
            if not torch.equal(got, w * 10):
                errors.append((k, i))
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and weight_cache.size() <= weight_cache.CAPACITY


def test_compiled_steps(device, no_tf32, packs):
    """Under ``torch.compile(fullgraph=True)`` (aot_eager) the traced calls see fake tensors and
    keep nothing; the compiled steps that run the kernels reuse the copies, and an optimizer step
    between them repacks (the results follow the new values)."""
    torch._dynamo.reset()
    x, w = _inputs(device)
    x, w = x.requires_grad_(), torch.nn.Parameter(w)
    step = torch.compile(lambda x, w: lk3d.conv3d(x, w, **ARGS), backend="aot_eager",
                         fullgraph=True)
    opt = torch.optim.SGD([w], lr=0.1)
    counts = []
    for _ in range(3):
        xr, wr = (t.detach().double().cpu() for t in (x, w))
        y = step(x, w)
        assert rel_err(y, F.conv3d(xr, wr, **ARGS)) < TOL[torch.float32]
        y.sum().backward()
        counts.append(len(packs))
        opt.step()
        opt.zero_grad()
    assert counts == [3, 6, 9]  # the forward and the two grad-input phases, once a step
    for _ in range(2):
        step(x, w)
    assert len(packs) == 10  # one forward pack for the two calls
