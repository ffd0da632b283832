"""NaN and Inf land where F.conv3d puts them, on every algorithm and route.

One NaN or Inf in an operand (the input, the weight, a CP factor or block-sparse values, or the
incoming gradient) must give the same NaN, +Inf and -Inf masks as ``F.conv3d`` in float64 — for
the output, grad-input, grad-weight (grad-factors, grad-values) and grad-bias — and the finite
values must still be right. ``lk3d.conv3d`` runs with ``LK3D_ALGO`` forced to ``aten``, ``fft``
and ``tiled`` (the Triton kernels, in the interpreter on the CPU: tiny shapes);
``lk3d.block_sparse_conv3d`` on its sparse and dense routes and on its kernels, against
``F.conv3d(x, weight.to_dense())``; ``lk3d.cp_conv3d`` on the factored sequence and the kernels,
against ``F.conv3d(x, factors.to_dense())``.

The references are float64: there ``F.conv3d`` multiplies the zero padding like any input value
(``0 · Inf = NaN``), as every lk3d algorithm does in float64; some of torch's float32 paths skip
the padding instead (see lk3d.fft's docstring), so the float32 case has none.

Each combo poisons two operands at once (e.g. a NaN in the input and an Inf in the gradient), one
element each near a corner, so that padding, stride and the kernel's border taps meet it: the
forward sees the first, the gradients both.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import lk3d
from _cases import Case, with_layout
from lk3d import _algos, block_sparse, fft
from lk3d import cp as cp_ops

NAN, INF = math.nan, math.inf

# Which operands get which value; "g" is the gradient of the output.
COMBOS = [dict(x=NAN, g=INF), dict(x=INF, w=NAN), dict(w=-INF, g=NAN)]
COMBO_IDS = ["x-nan-g-inf", "x-inf-w-nan", "w-neginf-g-nan"]


def _poison(t, value, last=False):
    """A copy of ``t`` with one element set to ``value``: index 1 on every dim (0 on a dim of
    one), near the first corner, for activations and gradients; with ``last`` the last element,
    a corner tap, for weights (it reads the padding at the borders)."""
    t = t.clone()
    t[tuple(s - 1 if last else min(1, s - 1) for s in t.shape)] = value
    return t


def _poisoned(combo, **tensors):
    """The tensors (keyword order kept) with the combo's values put in; "x" and "g" are
    activations, every other name a weight."""
    return [_poison(t, combo[k], last=k not in ("x", "g")) if k in combo else t
            for k, t in tensors.items()]


def assert_same_nonfinite(name, got, want, tol):
    """The NaN, +Inf and -Inf masks of ``got`` equal ``want``'s; the finite values agree within
    ``tol`` relative to the largest finite magnitude of ``want``."""
    got = got.detach().to("cpu", torch.float64)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    for what, mask in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        g, w = mask(got), mask(want)
        assert torch.equal(g, w), (f"{name}: {what} at {int(g.sum())} places, F.conv3d at "
                                   f"{int(w.sum())} ({int((g & ~w).sum())} extra, "
                                   f"{int((w & ~g).sum())} missing)")
    fin = torch.isfinite(want)
    if fin.any():
        scale = want[fin].abs().max().clamp_min(1e-30)
        err = ((got[fin] - want[fin]).abs().max() / scale).item()
        assert err < tol, f"{name}: finite values off by {err:.3g} (relative to the largest)"


def _grads(out, leaves, g):
    return torch.autograd.grad(out, leaves, g)


# ---------------------------------------------------------------------------------------------
# lk3d.conv3d, every algorithm
# ---------------------------------------------------------------------------------------------

CONV_CASES = [  # (case, layout of input and weight, see _cases.with_layout)
    # grouped implicit GEMM: stride, dilation, padding on some axes; strided input and weight
    (Case(1, 4, 4, (5, 6, 5), (3, 2, 3), stride=(2, 1, 2), padding=(1, 0, 1),
          dilation=(1, 2, 1), groups=2), "strided"),
    # depthwise with multiplier 2; "same" with an even kernel side pads asymmetrically
    (Case(1, 2, 4, (5, 4, 6), (2, 3, 3), padding="same", groups=2), "channels_last_3d"),
]


def _check_conv3d(case, combo, dtype, tol, layout):
    x, w, b = case.tensors()
    ref_y = F.conv3d(x, w, b, **case.args())
    gy = torch.randn(ref_y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x, w, gy = _poisoned(combo, x=x, w=w, g=gy)
    ref = [t.clone().requires_grad_() for t in (x, w, b)]
    want_y = F.conv3d(*ref, **case.args())
    want = _grads(want_y, ref, gy)
    got = [t.to(dtype).requires_grad_() for t in (*with_layout(x, w, layout), b)]
    x_before = got[0].detach().clone()
    y = lk3d.conv3d(*got, **case.args())
    assert_same_nonfinite("output", y, want_y, tol)
    for name, g, r in zip(("grad_input", "grad_weight", "grad_bias"),
                          _grads(y, got, gy.to(dtype)), want):
        assert_same_nonfinite(name, g, r, tol)
    assert torch.allclose(got[0].detach(), x_before, rtol=0, atol=0, equal_nan=True), \
        "the input was modified"


@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("case,layout", CONV_CASES, ids=lambda c: getattr(c, "id", c))
@pytest.mark.parametrize("algo", ["aten", "fft", "tiled"])
def test_conv3d(algo, case, layout, combo, monkeypatch):
    monkeypatch.setenv("LK3D_ALGO", algo)
    _check_conv3d(case, combo, torch.float64, 1e-10, layout)


@pytest.mark.parametrize("combo", [dict(x=NAN, g=INF), dict(x=-INF, w=INF), dict(w=NAN, g=-INF)],
                         ids=["x-nan-g-inf", "x-neginf-w-inf", "w-nan-g-neginf"])
def test_fft_large_kernel_float32(combo, monkeypatch):
    """The case the planner gives the FFT by default: a large kernel in float32 (on the CPU a
    side of 15 sends aten through channels_last_3d). Without padding: where an Inf or NaN meets
    the zero padding torch's own float32 paths disagree (see the module docstring of lk3d.fft)."""
    monkeypatch.setenv("LK3D_ALGO", "fft")
    _check_conv3d(Case(1, 2, 3, (15, 18, 16), (11, 15, 13)), combo, torch.float32, 1e-5,
                  "channels_last_3d")


def test_fft_runs_when_everything_is_finite(monkeypatch):
    """The finiteness check sends only non-finite operands to aten: the FFT still serves
    finite ones (a large value included), pass by pass."""
    monkeypatch.setenv("LK3D_ALGO", "fft")
    calls = []
    for name in ("conv3d_forward", "conv3d_grad_input", "conv3d_grad_weight"):
        monkeypatch.setattr(fft, name, lambda *a, _f=getattr(fft, name), _n=name, **k:
                            calls.append(_n) or _f(*a, **k))
    case = CONV_CASES[0][0]
    x, w, b = (t.float().requires_grad_() for t in case.tensors())
    with torch.no_grad():
        x[0, 0, 0, 0, 0] = 3e37
    y = lk3d.conv3d(x, w, b, **case.args())
    y.backward(torch.ones_like(y))
    assert calls == ["conv3d_forward", "conv3d_grad_input", "conv3d_grad_weight"]
    calls.clear()
    with torch.no_grad():
        x[0, 0, 0, 0, 0] = NAN
    lk3d.conv3d(x, w, b, **case.args()).backward(torch.ones_like(y))
    assert calls == ["conv3d_grad_input"]  # the only pass that does not read the input


def test_finite():
    x = torch.randn(3, 4)
    assert _algos.finite(x, None, x[:0])
    assert _algos.finite(torch.full((4096,), 60000.0, dtype=torch.float16))  # sum past fp16
    for bad in (NAN, INF, -INF):
        assert not _algos.finite(x, _poison(x, bad))
    pair = torch.tensor([INF, -INF])
    assert not _algos.finite(pair[:1], pair[1:])  # +Inf and -Inf do not cancel


# ---------------------------------------------------------------------------------------------
# lk3d.block_sparse_conv3d, every route, against F.conv3d(x, weight.to_dense())
# ---------------------------------------------------------------------------------------------

BS_CASES = [  # (case, block_shape): channel blocks of one tap; a depthwise brick along W
    (Case(1, 4, 4, (5, 6, 5), (3, 2, 3), stride=(2, 1, 1), padding=(1, 0, 1),
          dilation=(1, 2, 1)), (2, 2, 1, 1, 1)),
    (Case(1, 4, 4, (5, 4, 6), (2, 3, 3), padding="same", groups=4), (2, 1, 1, 1, 3)),
]


@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("case,block", BS_CASES, ids=["channel-blocks", "depthwise-bricks"])
@pytest.mark.parametrize("route", ["sparse", "dense", "kernels"])
def test_block_sparse(route, case, block, combo, monkeypatch):
    monkeypatch.setattr(block_sparse, "USE_KERNELS", route == "kernels")
    monkeypatch.setattr(block_sparse, "ROUTE", "auto" if route == "kernels" else route)
    x, w, b = case.tensors()
    ws = lk3d.BlockSparseWeight.from_dense(w, block, density=0.5)
    assert 0 < ws.nnz < math.prod(ws.grid)  # unstored blocks: the zeros that matter here
    gy = torch.randn(F.conv3d(x, w, b, **case.args()).shape, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(7))
    x, values, gy = _poisoned(combo, x=x, w=ws.values, g=gy)
    leaves = [t.clone().requires_grad_() for t in (x, values, b)]
    want_y = F.conv3d(leaves[0], ws.with_values(leaves[1]).to_dense(), leaves[2], **case.args())
    want = _grads(want_y, leaves, gy)
    got = [t.clone().requires_grad_() for t in (x, values, b)]
    y = lk3d.block_sparse_conv3d(got[0], ws.with_values(got[1]), got[2], **case.args())
    assert_same_nonfinite("output", y, want_y, 1e-10)
    for name, g, r in zip(("grad_input", "grad_values", "grad_bias"), _grads(y, got, gy), want):
        assert_same_nonfinite(name, g, r, 1e-10)


# ---------------------------------------------------------------------------------------------
# lk3d.cp_conv3d, both algorithms, against F.conv3d(x, factors.to_dense())
# ---------------------------------------------------------------------------------------------

CP_NAMES = ("x", "U_out", "U_in", "A", "B", "C", "weights", "bias")
CP_COMBOS = [dict(x=NAN, g=INF), dict(x=INF, A=NAN), dict(U_out=-INF, g=NAN),
             dict(weights=INF), dict(C=INF, g=INF)]


@pytest.mark.parametrize("combo", CP_COMBOS, ids=lambda c: "-".join(
    f"{k}-{v}" for k, v in c.items()))
@pytest.mark.parametrize("algo", ["aten", "tiled"])
def test_cp(algo, combo, monkeypatch):
    monkeypatch.setenv("LK3D_ALGO", algo)
    monkeypatch.setattr(cp_ops, "USE_KERNELS", True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 5, 6, 5, generator=g, dtype=torch.float64)
    rows, rank = (4, 3, 3, 2, 3), 3
    tensors = [x, *(torch.randn(n, rank, generator=g, dtype=torch.float64) for n in rows),
               torch.rand(rank, generator=g, dtype=torch.float64) + 0.5,
               torch.randn(4, generator=g, dtype=torch.float64)]
    args = dict(stride=(2, 1, 1), padding=(1, 0, 1), dilation=(1, 2, 1))
    gy = torch.randn(1, 4, 3, 4, 5, generator=g, dtype=torch.float64)
    *tensors, gy = _poisoned(combo, **dict(zip(CP_NAMES, tensors)), g=gy)

    def run(conv, dense):
        leaves = [t.clone().requires_grad_() for t in tensors]
        factors = lk3d.CPFactors(*leaves[1:7])
        y = conv(leaves[0], factors.to_dense() if dense else factors, leaves[7], **args)
        return y, _grads(y, leaves, gy)
    want_y, want = run(F.conv3d, True)
    y, got = run(lk3d.cp_conv3d, False)
    assert_same_nonfinite("output", y, want_y, 1e-10)
    for name, gr, r in zip(CP_NAMES, got, want):
        assert_same_nonfinite(f"grad {name}", gr, r, 1e-10)


def test_cp_without_weights_some_gradients():
    """The dense fallback with ``weights=None`` and only some gradients asked for."""
    g = torch.Generator().manual_seed(5)
    x = _poison(torch.randn(2, 3, 5, 4, 6, generator=g, dtype=torch.float64), INF)
    mats = [torch.randn(n, 2, generator=g, dtype=torch.float64) for n in (4, 3, 3, 1, 2)]
    gy = torch.randn(2, 4, 5, 4, 5, generator=g, dtype=torch.float64)

    def run(conv, dense):
        x_, ui = x.clone().requires_grad_(), mats[1].clone().requires_grad_()
        factors = lk3d.CPFactors(mats[0], ui, *mats[2:])
        y = conv(x_, factors.to_dense() if dense else factors, padding=(1, 0, 0))
        return y, _grads(y, [x_, ui], gy)
    (want_y, want), (y, got) = run(F.conv3d, True), run(lk3d.cp_conv3d, False)
    assert_same_nonfinite("output", y, want_y, 1e-10)
    for name, gr, r in zip(("input", "U_in"), got, want):
        assert_same_nonfinite(f"grad {name}", gr, r, 1e-10)
