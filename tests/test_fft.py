"""The FFT algorithm (lk3d.fft) against a float64 F.conv3d reference.

Through ``lk3d.conv3d`` with ``LK3D_ALGO=fft`` (forward, the three gradients, every shared case, a
fuzz, low precision, gradcheck, layouts), and its pieces directly: ``xcorr`` at explicit transform
lengths (the overlap-save tiling), memory chunking, ``next_fast``, ``plan_tiles`` and
``kernel_spectrum``.
"""
import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lk3d
from _cases import CASES, TOL, Case, conv3d_ref, rel_err, with_layout
from lk3d import fft

# The FFT rounds more than a direct sum: fp64 results are ~1e-15 relative, far inside this.
FFT_TOL = {**TOL, torch.float64: 1e-10}


@pytest.fixture(autouse=True)
def fft_algo(monkeypatch):
    """Every convolution in this file runs the FFT algorithm."""
    monkeypatch.setenv("LK3D_ALGO", "fft")
    monkeypatch.delenv("LK3D_FFT_MEMORY_MB", raising=False)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in ts]


def _err(got, want):
    """Relative error; absolute where the reference is exactly zero (a fuzzed output, or a
    weight gradient, that sees only padding: the FFT leaves ~1e-17 there instead of 0)."""
    assert got.shape == want.shape
    if want.numel() == 0:
        return 0.0
    if want.detach().norm() == 0:
        assert torch.isfinite(got).all()
        return got.detach().abs().max().item()
    return rel_err(got, want)


def _check_forward_backward(case, dtype, device, x, w, b, grad_tol):
    """lk3d.conv3d(x, w, b) in ``dtype`` against the float64 autograd reference."""
    x, w, b = (None if t is None else t.to(device=device, dtype=dtype) for t in (x, w, b))
    x, w, b = _leaves(x, w, b)
    xr, wr, br = _leaves(*(None if t is None else t.cpu().double() for t in (x, w, b)))
    y = lk3d.conv3d(x, w, b, **case.args())
    ref = F.conv3d(xr, wr, br, **case.args())
    assert y.dtype == dtype
    assert _err(y, ref) < FFT_TOL[dtype]

    gy = torch.randn(ref.shape, dtype=torch.float64).to(dtype)  # rounded once: both see it
    got = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], gy.to(device))
    want = torch.autograd.grad(ref, [t for t in (xr, wr, br) if t is not None], gy.double())
    for name, g, r in zip(("input", "weight", "bias"), got, want):
        assert g.dtype == dtype, name
        assert _err(g, r) < grad_tol, name


# ---------------------------------------------------------------------------------------------
# lk3d.conv3d with LK3D_ALGO=fft
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cases_forward_backward(case, dtype, device):
    x, w, b = case.tensors()
    _check_forward_backward(case, dtype, device, x, w, b, grad_tol=FFT_TOL[dtype] * 10)


def test_forced_fft_is_what_runs(device):
    case = CASES[0]
    x, w, b = case.tensors(device=device)
    plans = lk3d.explain(x, w, b, **case.args())
    assert {p["algo"] for p in plans.values()} == {"fft"}
    assert {p["source"] for p in plans.values()} == {"forced"}


@st.composite
def conv_cases(draw):
    form = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if form == "dense":  # sometimes without input channels (F.conv3d: nor output channels)
        groups, cg, og = 1, draw(st.sampled_from([1, 2, 3, 4] * 2 + [0])), draw(st.integers(1, 4))
    elif form == "grouped":
        groups, cg, og = draw(st.integers(2, 3)), draw(st.integers(2, 3)), draw(st.integers(1, 3))
    else:  # depthwise, with channel multiplier og
        groups, cg, og = draw(st.integers(1, 4)), 1, draw(st.integers(1, 3))
    kernel = tuple(draw(st.lists(st.integers(1, 6), min_size=3, max_size=3)))
    dilation = tuple(draw(st.lists(st.integers(1, 3), min_size=3, max_size=3)))
    stride = tuple(draw(st.lists(st.integers(1, 3), min_size=3, max_size=3)))
    pad_form = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if pad_form == "int":
        padding = draw(st.integers(0, 3))
    elif pad_form == "tuple":
        padding = tuple(draw(st.lists(st.integers(0, 3), min_size=3, max_size=3)))
    else:
        padding = pad_form
    if padding == "same":
        stride = (1, 1, 1)
    extent = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    if pad_form == "same":
        total_pad = [e - 1 for e in extent]
    elif pad_form == "valid":
        total_pad = [0, 0, 0]
    else:
        total_pad = [2 * p for p in ((padding,) * 3 if pad_form == "int" else padding)]
    size = tuple(max(1, e - p) + draw(st.integers(0, 5)) for e, p in zip(extent, total_pad))
    return Case(draw(st.integers(1, 3)), groups * cg, groups * og, size, kernel, stride=stride,
                padding=padding, dilation=dilation, groups=groups, bias=draw(st.booleans()))


@settings(max_examples=60, deadline=None)
@given(case=conv_cases(), seed=st.integers(0, 2 ** 16))
def test_fuzz_float64(case, seed):
    x, w, b = case.tensors(seed=seed)
    _check_forward_backward(case, torch.float64, "cpu", x, w, b, grad_tol=FFT_TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]], ids=lambda c: c.id)
def test_low_precision(case, dtype, device):
    """Computed in fp32: the error is that of rounding the result to the input's dtype."""
    x, w, b = case.tensors()
    _check_forward_backward(case, dtype, device, x, w, b, grad_tol=FFT_TOL[dtype])


GRADCHECK_CASES = [
    Case(1, 2, 3, (4, 3, 5), (2, 3, 2), stride=(2, 1, 2), padding=1),
    Case(2, 4, 4, (5, 5, 4), (3, 2, 2), padding="same", dilation=(2, 1, 2), groups=2),
    Case(1, 2, 4, (5, 4, 3), (3, 3, 1), padding=(1, 0, 0), groups=2),  # depthwise, multiplier 2
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: c.id)
def test_gradcheck(case, device):
    x, w, b = _leaves(*case.tensors(device=device))
    assert torch.autograd.gradcheck(lambda x, w, b: lk3d.conv3d(x, w, b, **case.args()),
                                    (x, w, b), fast_mode=True)


# ---------------------------------------------------------------------------------------------
# the overlap-save correlation at explicit transform lengths
# ---------------------------------------------------------------------------------------------

XCORR_E = (3, 7, 4)          # dilated extents of kernel (3, 4, 2) at dilation (1, 2, 3)
XCORR_Q = (9, 8, 6)          # outputs per axis
LENGTHS = {
    "min": (4, 8, 5),         # extent + 1: two outputs per tile, many tiles
    "one-per-tile": (3, 7, 4),  # extent: one output per tile
    "non-pow2": (6, 9, 7),
    "single-tile": (11, 14, 9),  # Q + extent - 1 (not fast sizes)
    "over-long": (16, 18, 12),
    "mixed": (4, 14, 7),
}


@pytest.mark.parametrize("groups,cin,cout", [(1, 3, 2), (2, 4, 6), (3, 3, 6)],
                         ids=["dense", "grouped", "depthwise-x2"])
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_xcorr_transform_lengths(lengths, groups, cin, cout, device):
    L = LENGTHS[lengths]
    dil = (1, 2, 3)
    x = torch.randn(2, cin, *(q + e - 1 for q, e in zip(XCORR_Q, XCORR_E)), dtype=torch.float64,
                    device=device)
    w = torch.randn(cout, cin // groups, 3, 4, 2, dtype=torch.float64, device=device)
    ref = F.conv3d(x.cpu(), w.cpu(), dilation=dil, groups=groups)
    assert tuple(ref.shape[2:]) == XCORR_Q
    got = fft.xcorr(x, w, dil, XCORR_Q, groups, L=L)
    assert got.dtype == torch.float64
    assert rel_err(got, ref) < FFT_TOL[torch.float64]
    planned = fft.xcorr(x, w, dil, XCORR_Q, groups)
    assert rel_err(planned, ref) < FFT_TOL[torch.float64]


# ---------------------------------------------------------------------------------------------
# memory chunking
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def rfftn_calls(monkeypatch):
    """Counts torch.fft.rfftn calls (one per chunk of input tiles / of the grad-weight batch)."""
    calls = []
    real = torch.fft.rfftn

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(torch.fft, "rfftn", counting)
    return calls


def test_memory_chunking_keeps_results(monkeypatch, rfftn_calls, device):
    case = Case(3, 6, 6, (6, 5, 7), (3, 2, 3), padding=1, groups=3)
    x, w, b = case.tensors(device=device)
    gy = torch.randn(case.N, case.cout, 6, 6, 7, dtype=torch.float64, device=device)

    def run():
        xl, wl, bl = _leaves(x, w, b)
        y = lk3d.conv3d(xl, wl, bl, **case.args())
        return (y, *torch.autograd.grad(y, [xl, wl, bl], gy))

    rfftn_calls.clear()
    whole = run()
    unchunked_calls = len(rfftn_calls)
    monkeypatch.setenv("LK3D_FFT_MEMORY_MB", "0.01")
    rfftn_calls.clear()
    chunked = run()
    # forward and grad-input: one per (group, sample) each; grad-weight: two per (group, sample)
    assert len(rfftn_calls) == 4 * case.groups * case.N > unchunked_calls
    xr, wr, br = _leaves(*case.tensors())
    ref = F.conv3d(xr, wr, br, **case.args())
    refs = (ref, *torch.autograd.grad(ref, [xr, wr, br], gy.cpu()))
    for name, a, c, r in zip(("output", "input", "weight", "bias"), chunked, whole, refs):
        assert rel_err(a, c) < 1e-13, name
        assert rel_err(a, r) < FFT_TOL[torch.float64], name


@pytest.mark.parametrize("groups, cin, cout", [(2, 4, 6), (5, 5, 10)], ids=["grouped", "depthwise"])
def test_memory_chunking_grad_weight_direct(monkeypatch, rfftn_calls, groups, cin, cout):
    """conv3d_grad_weight alone, strided, grouped or depthwise (channel multiplier 2: the
    elementwise product), chunked over groups and a batch of 3."""
    stride, padding, dilation = (2, 1, 2), (1, 0, 2, 1, 1, 0), (1, 2, 1)
    x = torch.randn(3, cin, 7, 6, 9, dtype=torch.float64)
    w = torch.randn(cout, cin // groups, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    xp = F.pad(x, (2, 0, 0, 1, 1, 1))
    y = F.conv3d(xp, w, stride=stride, dilation=dilation, groups=groups)
    gy = torch.randn_like(y)
    ref, = torch.autograd.grad(y, w, gy)
    args = (gy, x, list(w.shape), stride, padding, dilation, groups)
    rfftn_calls.clear()
    whole = fft.conv3d_grad_weight(*args)
    assert len(rfftn_calls) == 2
    monkeypatch.setenv("LK3D_FFT_MEMORY_MB", "0.01")
    rfftn_calls.clear()
    chunked = fft.conv3d_grad_weight(*args)
    assert len(rfftn_calls) == 2 * groups * x.shape[0]
    assert rel_err(chunked, whole) < 1e-13
    assert rel_err(whole, ref) < FFT_TOL[torch.float64]
    assert rel_err(chunked, ref) < FFT_TOL[torch.float64]


# ---------------------------------------------------------------------------------------------
# sizes, plans, the kernel spectrum
# ---------------------------------------------------------------------------------------------

def _smooth(n):
    for p in (2, 3, 5, 7):
        while n % p == 0:
            n //= p
    return n == 1


def _next_smooth(n):
    return next(m for m in range(n, 2 * n + 8) if _smooth(m))


def test_next_fast():
    for n in range(1, 2161):
        assert fft.next_fast(n) == _next_smooth(n), n


def test_next_fast_up_to_4096():
    for n in range(2161, 4097):
        assert fft.next_fast(n) == _next_smooth(n), n


@pytest.mark.parametrize("Q,E,K,N,cin,cout,groups", [
    ((48, 48, 48), (21, 21, 21), (21, 21, 21), 1, 16, 16, 1),
    ((9, 1, 30), (3, 5, 13), (3, 5, 7), 2, 4, 4, 4),
    ((100, 7, 2), (1, 7, 2), (1, 4, 2), 3, 6, 3, 3),
])
def test_plan_tiles(Q, E, K, N, cin, cout, groups):
    L, secs = fft.plan_tiles(Q, E, K, N, cin, cout, groups)
    assert len(L) == 3
    assert 0 < secs < math.inf
    for q, e, length in zip(Q, E, L):
        # Each tile keeps B = L - E + 1 outputs: at least two unless one output is all there is.
        assert length >= (e + 1 if q > 1 else e), (Q, E, L)
        assert length <= fft.next_fast(q + e - 1) and _smooth(length)
    assert secs == pytest.approx(fft.fft_seconds(L, Q, E, K, N, cin, cout, groups))


@pytest.mark.parametrize("q,e", [
    (64, 31),
    (128, 7),
])
def test_plan_tiles_reaches_its_own_optimum(q, e):
    """No cubic fast length models cheaper than the plan (the plan searches all three axes)."""
    Q, E = (q,) * 3, (e,) * 3
    _, secs = fft.plan_tiles(Q, E, E, 2, 8, 8, 1)
    lengths = [f for f in fft._FAST if e + 1 <= f <= fft.next_fast(q + e - 1)]
    best = min(fft.fft_seconds((f,) * 3, Q, E, E, 2, 8, 8, 1) for f in lengths)
    assert secs <= best * (1 + 1e-9)


@pytest.mark.parametrize("cout,cg,groups,dil", [(4, 2, 2, (2, 1, 3)), (6, 2, 3, (1, 1, 1)),
                                                (3, 1, 3, (1, 3, 2))],
                         ids=["grouped-dilated", "grouped", "depthwise-dilated"])
def test_kernel_spectrum(cout, cg, groups, dil, device):
    k, L = (3, 2, 3), (8, 5, 12)
    w = torch.randn(cout, cg, *k, dtype=torch.float64, device=device)
    padded = w.new_zeros(cout, cg, *L)
    padded[:, :, :dil[0] * (k[0] - 1) + 1:dil[0], :dil[1] * (k[1] - 1) + 1:dil[1],
           :dil[2] * (k[2] - 1) + 1:dil[2]] = w
    want = torch.fft.rfftn(padded, dim=(-3, -2, -1)).conj()          # [cout, cg, Ld, Lh, Fw]
    want = want.reshape(groups, cout // groups, cg, -1).permute(0, 3, 2, 1)  # [G, Fr, cg, og]
    got = fft.kernel_spectrum(w, L, dil, groups, torch.complex128)
    assert got.shape == (groups, L[0] * L[1] * (L[2] // 2 + 1), cg, cout // groups)
    assert got.dtype == torch.complex128 and got.is_contiguous()
    assert torch.allclose(got, want, rtol=0, atol=1e-12 * want.abs().max().item())
    got32 = fft.kernel_spectrum(w.float(), L, dil, groups, torch.complex64)
    assert got32.dtype == torch.complex64
    assert torch.allclose(got32.to(torch.complex128), want, rtol=0,
                          atol=1e-5 * want.abs().max().item())


# ---------------------------------------------------------------------------------------------
# layouts and inputs left alone
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d", "strided", "permuted"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[11]], ids=lambda c: c.id)
def test_layouts(case, layout, device):
    x, w, b = case.tensors(device=device, dtype=torch.float32)
    x, w = with_layout(x, w, layout)
    before = [t.clone() for t in (x, w, b)]
    x.requires_grad_()
    y = lk3d.conv3d(x, w, b, **case.args())
    ref = conv3d_ref(x, w, b, **case.args())
    assert rel_err(y, ref) < FFT_TOL[torch.float32]
    gy = torch.randn_like(y)
    gx, = torch.autograd.grad(y, x, gy)
    for t, old in zip((x, w, b), before):
        assert torch.equal(t, old), "inputs were modified"
    if layout == "channels_last_3d":
        assert y.is_contiguous(memory_format=torch.channels_last_3d)
        assert gx.is_contiguous(memory_format=torch.channels_last_3d)
    else:
        assert y.is_contiguous() and gx.is_contiguous()
    x_plain = x.detach().contiguous().requires_grad_()
    y_plain = lk3d.conv3d(x_plain, w, b, **case.args())
    assert rel_err(y, y_plain) < 1e-6
    assert rel_err(gx, torch.autograd.grad(y_plain, x_plain, gy)[0]) < 1e-6


def test_fft_seconds_is_cost_times_features():
    args = ((48, 40, 44), (21, 9, 15), (21, 9, 15), 2, 16, 8, 2)
    for L in [(45, 24, 30), (70, 48, 60)]:
        f = fft.fft_features(L, *args)
        assert set(f) == set(fft.COST)
        assert all(v >= 0 for v in f.values())
        assert fft.fft_seconds(L, *args) == pytest.approx(
            sum(fft.COST[n] * v for n, v in f.items()))
    dense = fft.fft_features((45, 24, 30), *args)
    depthwise = fft.fft_features((45, 24, 30), (48, 40, 44), (21, 9, 15), (21, 9, 15),
                                 2, 16, 16, 16)
    assert dense["bmm"] > 0 and dense["elem"] == 0 and dense["move"] > 0
    assert depthwise["bmm"] == 0 and depthwise["elem"] > 0 and depthwise["move"] == 0
    # fewer, longer tiles: fewer tiles, more kernel-spectrum work
    short, long = (fft.fft_features(L, *args) for L in [(24, 12, 16), (70, 48, 60)])
    assert short["tile"] > long["tile"] and short["dft"] < long["dft"]


def test_plan_tiles_searches_candidate_lengths():
    Q, E = (48, 20, 33), (15, 5, 7)
    cands = fft.candidate_lengths(Q, E)
    L, secs = fft.plan_tiles(Q, E, E, 1, 8, 8, 1)
    assert all(length in axis for length, axis in zip(L, cands))
    assert secs == pytest.approx(min(fft.fft_seconds(c, Q, E, E, 1, 8, 8, 1)
                                     for c in itertools.product(*cands)))


@pytest.mark.parametrize("name", ["h100", "a100"])
def test_plan_tiles_on_a_gpu_minimises_its_model(name, monkeypatch):
    """With a GPU's figures the lengths minimise that device's modelled time (not the host's
    fitted seconds), whatever the host's thread count."""
    from lk3d import _cuda_model
    from lk3d.autotune import devices

    gpu = devices.named(name)
    Q, E, args = (96, 40, 61), (7, 7, 5), (2, 12, 12, 12)
    cands = fft.candidate_lengths(Q, E)
    plans = []
    for threads in (1, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        fft.plan_tiles.cache_clear()
        plans.append(fft.plan_tiles(Q, E, E, *args, gpu))
    L, secs = plans[0]
    assert plans[1] == plans[0]
    assert all(length in axis for length, axis in zip(L, cands))
    ms = [_cuda_model.fft_ms(c, Q, E, E, *args, 0, gpu) for c in itertools.product(*cands)]
    assert 1e3 * secs == pytest.approx(min(ms))
    assert fft.plan_tiles(Q, E, E, *args) != (L, secs)  # the host's plan is priced differently


def test_grad_weight_cuda_model_prices_whole_volume_transforms():
    """On a GPU the FFT's grad-weight is priced as it runs: one transform of the whole padded
    volume per operand (lengths ``next_fast`` of it), not as a tiled correlation."""
    from lk3d import _algos, _cuda_model
    from lk3d.autotune import devices

    gpu = devices.named("h100")
    x_shape, padding = [2, 6, 13, 10, 17], (1, 2, 0, 1, 2, 0)
    for w_shape, groups in (([6, 1, 3, 5, 2], 6), ([4, 3, 3, 5, 2], 2)):
        E = tuple(w_shape[2:])
        P = [s + padding[i] + padding[i + 3] for i, s in enumerate(x_shape[2:])]
        L, f = fft.grad_weight_features(P, E, E, 2, 6, w_shape[0], groups)
        assert L == tuple(fft.next_fast(p) for p in P) and f["tile"] == 2
        assert (f["elem"] > 0) == (groups == 6) and (f["bmm"] > 0) == (groups != 6)
        got = _algos.model_ms("fft", x_shape, w_shape, (1, 1, 1), padding, (1, 1, 1), groups,
                              torch.bfloat16, gpu, op="conv3d_grad_weight")
        size = [p - e + 1 for p, e in zip(P, E)]
        moved = (2 + 8) * 2 * (6 * math.prod(x_shape[2:]) + w_shape[0] * math.prod(size))
        assert got == pytest.approx(_cuda_model.features_ms(f, L, moved, gpu))
        forward = _algos.model_ms("fft", x_shape, w_shape, (1, 1, 1), padding, (1, 1, 1),
                                  groups, torch.bfloat16, gpu)
        assert got != pytest.approx(forward)


def test_fit_fft_model_recovers_known_constants():
    """perf_reports/fit_fft_model.py's fit, on times made from known constants."""
    spec = importlib.util.spec_from_file_location(
        "fit_fft_model", Path(__file__).parents[1] / "perf_reports" / "fit_fft_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    truth = {"fft": 2e-10, "dft": 1e-10, "bmm": 4e-10, "elem": 5e-9, "move": 5e-9, "tile": 1e-4}
    rows = []
    for Q, K, N, cin, cout, groups in mod.PROBLEMS:
        for L in itertools.islice(itertools.product(*fft.candidate_lengths(Q, K)), 0, None, 7):
            f = fft.fft_features(L, Q, K, K, N, cin, cout, groups)
            rows.append(dict(problem=[Q, K, N, cin, cout, groups], L=list(L), features=f,
                             ms=1e3 * sum(truth[n] * v for n, v in f.items())))
    fitted = mod.fit(rows, list(truth))
    for name, value in truth.items():
        assert fitted[name] == pytest.approx(value, rel=1e-3), name
    assert all(r == pytest.approx(1.0) for _, r, _, _ in mod.regret(rows, fitted))
