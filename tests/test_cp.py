"""Rank-R CP convolution (``lk3d.cp``): ``lk3d.cp_conv3d`` against ``F.conv3d`` with the
reconstructed dense kernel (float64, every argument form, ranks 1 to 32, non-cubic kernels),
gradients (gradcheck, and against autograd through the dense kernel), the ``lk3d::cp_conv3d``
ops (opcheck, ``torch.compile(fullgraph=True)``), a hypothesis fuzz and argument errors.
``lk3d.CPFactors`` is tested in test_cp_factors.py, ``lk3d.nn.CPConv3d`` in test_cp_nn.py.

Every test here runs the torch path, the factored sequence (``lk3d.cp.USE_KERNELS`` is switched
off by an autouse fixture): it is what CPU users get without the interpreter. The fuzz runs both
that path and the Triton kernels (under the interpreter on the CPU); the kernels have their own
tests in test_cp_kernel.py.
"""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lk3d
from _cases import (TOL, Case, assert_close_rel, assert_one_node, draw_geometry, leaf_like,
                    raises_naming, strided_copy)
from lk3d import cp as cp_ops
from lk3d.cp import cp_conv3d_ref

CP = Case.cp

FACTOR_NAMES = ("U_out", "U_in", "A", "B", "C", "weights")


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    monkeypatch.setattr(cp_ops, "USE_KERNELS", False)


CASES = [
    CP(2, 3, 4, (7, 9, 5), (3, 5, 3), 1, padding=(1, 2, 0)),
    CP(1, 4, 6, (9, 7, 8), (3, 3, 2), 4, stride=(2, 1, 3), padding=1, dilation=(1, 2, 1)),
    CP(2, 5, 3, (11, 7, 6), (7, 3, 5), 8, padding="same"),
    CP(1, 2, 2, (23, 5, 7), (21, 1, 3), 3, padding="same", bias=False),
    CP(1, 3, 2, (5, 23, 6), (1, 21, 3), 2, padding="valid", weights=False),
    # Even kernel sides with "same": asymmetric padding (one more on the right).
    CP(1, 3, 5, (6, 7, 5), (4, 2, 3), 6, padding="same", dilation=(1, 2, 1)),
    CP(1, 4, 4, (13, 11, 7), (2, 2, 2), 16, stride=3),
    CP(2, 6, 8, (9, 9, 9), (5, 5, 5), 32, padding=2, dilation=2),
    CP(2, 3, 3, (10, 9, 8), (3, 2, 4), 12, stride=(1, 2, 2), padding="valid",
       dilation=(2, 1, 1)),
    CP(None, 3, 4, (5, 6, 7), (3, 3, 3), 5, padding=1),
    CP(2, 4, 3, (6, 5, 7), (3, 1, 5), 7, padding=(1, 0, 2), layout="channels_last_3d"),
    CP(1, 1, 1, (4, 4, 4), (1, 1, 1), 2, weights=False),
]


def _leaves(x, factors, bias):
    """Fresh leaf copies requiring grad, and a function of them giving the CP output."""
    names = ["input", *(n for n, t in zip(FACTOR_NAMES, factors.tensors()) if t is not None)]
    names += ["bias"] if bias is not None else []
    tensors = [x, *(t for t in factors.tensors() if t is not None)]
    tensors += [bias] if bias is not None else []
    leaves = [leaf_like(t) for t in tensors]
    has_w, has_b = factors.weights is not None, bias is not None

    def rebuild(leaves):
        x, *rest = leaves
        b = rest.pop() if has_b else None
        w = rest.pop() if has_w else None
        return x, lk3d.CPFactors(*rest, w), b
    return names, leaves, rebuild


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_dense_conv3d(case, device):
    x, factors, bias = case.tensors(device=device)
    names, leaves, rebuild = _leaves(x, factors, bias)
    got = lk3d.cp_conv3d(*rebuild(leaves), **case.args())
    lx, lf, lb = rebuild(leaves)
    want = F.conv3d(lx, lf.to_dense(), lb, **case.args())
    assert got.shape == want.shape
    assert_close_rel("output", got, want, TOL[torch.float64])
    if case.layout == "channels_last_3d":
        assert got.is_contiguous(memory_format=torch.channels_last_3d)

    grad = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, leaves, grad)
    want_grads = torch.autograd.grad(want, leaves, grad)
    for name, g, w in zip(names, got_grads, want_grads):
        assert g.shape == w.shape, name
        assert_close_rel(f"grad {name}", g, w, 1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[-1])
def test_low_precision(dtype):
    case = CASES[2]
    x, factors, bias = case.tensors()
    want = cp_conv3d_ref(x, factors, bias, **case.args())
    got = lk3d.cp_conv3d(*case.tensors(dtype), **case.args())
    assert got.dtype == dtype
    # Each factor is rounded to dtype, and the sequence rounds five times.
    assert_close_rel("output", got, want, 4 * TOL[dtype])


@pytest.mark.parametrize("case", [
    CP(1, 2, 3, (4, 5, 3), (2, 3, 2), 2, padding="same", dilation=(1, 1, 2)),
    CP(2, 2, 2, (5, 4, 6), (3, 2, 3), 3, stride=(2, 1, 2), padding=(1, 0, 1)),
    CP(None, 2, 2, (4, 4, 4), (3, 3, 1), 2, padding="valid", weights=False),
], ids=lambda c: c.id)
def test_gradcheck(case, device):
    x, factors, bias = case.tensors(device=device)
    _, leaves, rebuild = _leaves(x, factors, bias)
    assert torch.autograd.gradcheck(lambda *t: lk3d.cp_conv3d(*rebuild(t), **case.args()),
                                    leaves)


def test_cuda_cost_model_prefers_the_sequence_at_large_kernels(monkeypatch):
    """The plan's CUDA model, priced from an H100's figures: the fused kernels (2·k³·Cin·R FLOPs
    per voxel at their issue ceiling, ~12% of tensor peak) win at small kernels (1³; 3³ is about
    even), the factored sequence (memory-bound) from 5³ and by far at 21³; the backward costs
    more than the forward."""
    from lk3d.autotune import devices
    monkeypatch.setattr(devices, "of", lambda device: devices.named("h100"))
    cuda = torch.device("cuda")

    def ms(algo, k, backward=False):
        return cp_ops.model_ms(algo, [1, 64, 64, 64, 64], 64, 16, (k,) * 3, [1, 1, 1],
                               [k // 2] * 6, [1, 1, 1], torch.bfloat16, cuda, backward)
    assert ms("tiled", 1) < ms("aten", 1) and ms("tiled", 5) > ms("aten", 5)
    assert ms("tiled", 21) > 10 * ms("aten", 21)
    for algo in ("tiled", "aten"):
        assert ms(algo, 7, backward=True) > ms(algo, 7)
    cpu = cp_ops.model_ms("aten", [1, 16, 32, 32, 32], 16, 8, (15,) * 3, [1, 1, 1], [7] * 6,
                          [1, 1, 1], torch.float32, torch.device("cpu"))
    assert 0 < cpu < math.inf


@pytest.mark.parametrize("wanted", [(0,), (1,), (2,), (3,), (4,), (5,), (6,), (7,), (0, 4),
                                    (3, 6), (1, 2, 5)],
                         ids=lambda w: "+".join(["input", *FACTOR_NAMES, "bias"][i] for i in w))
def test_partial_gradients(wanted, device):
    """Only some operands require grad: the backward op skips the rest, and is still right."""
    case = CASES[5]
    x, factors, bias = case.tensors(device=device)
    names, leaves, rebuild = _leaves(x, factors, bias)
    for i, leaf in enumerate(leaves):
        leaf.requires_grad_(i in wanted)
    chosen = [leaves[i] for i in wanted]
    got = lk3d.cp_conv3d(*rebuild(leaves), **case.args())
    lx, lf, lb = rebuild(leaves)
    want = F.conv3d(lx, lf.to_dense(), lb, **case.args())
    grad = torch.randn_like(want)
    for i, g, w in zip(wanted, torch.autograd.grad(got, chosen, grad),
                       torch.autograd.grad(want, chosen, grad)):
        assert_close_rel(f"grad {names[i]}", g, w, 1e-10)


def test_empty_batch():
    x, factors, bias = CASES[1].tensors()
    want = cp_conv3d_ref(x, factors, bias, **CASES[1].args())
    x = x[:0].requires_grad_()
    y = lk3d.cp_conv3d(x, factors, bias, **CASES[1].args())
    assert y.shape == (0, *want.shape[1:])
    y.sum().backward()
    assert x.grad.shape == x.shape


def _call_errors():
    x, f, b = CP(1, 3, 4, (5, 6, 7), (3, 3, 3), 2).tensors()
    return [
        (dict(factors=f.to_dense()), TypeError, ["factors", "CPFactors", "Tensor"]),
        (dict(input=x[:, :2]), ValueError, ["input", "3 channels", "(1, 2, 5, 6, 7)"]),
        (dict(input=x[0, 0]), ValueError, ["input", "4-D or 5-D", "3-D"]),
        (dict(input=x.float()), TypeError, ["factors", "float32", "float64"]),
        (dict(factors=f.to("meta")), ValueError, ["factors", "cpu", "meta"]),
        (dict(bias=b[:3]), ValueError, ["bias", "(4,)", "(3,)"]),
        (dict(bias=b.float()), TypeError, ["bias", "float64", "float32"]),
        (dict(groups=3), ValueError, ["groups", "groups=1", "3"]),
        (dict(groups=1.0), TypeError, ["groups", "1.0"]),
        (dict(stride=0), ValueError, ["stride", "positive"]),
        (dict(stride=2, padding="same"), ValueError, ["padding", "'same'", "stride"]),
        (dict(padding="full"), ValueError, ["padding", "'full'"]),
        (dict(padding=(1, 2)), TypeError, ["padding", "(1, 2)"]),
        (dict(dilation=3), ValueError, ["factors", "kernel extent", "(7, 7, 7)"]),
    ], (x, f, b)


@pytest.mark.parametrize("index", range(len(_call_errors()[0])),
                         ids=[",".join(kw) for kw, _, _ in _call_errors()[0]])
def test_cp_conv3d_errors(index):
    cases, (x, f, b) = _call_errors()
    kwargs, error, names = cases[index]
    kwargs = {"input": x, "factors": f, "bias": b, **kwargs}
    with raises_naming(error, names):
        lk3d.cp_conv3d(**kwargs)


# ---------------------------------------------------------------------------------------------
# the custom ops: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------

PAD = [1, 0, 1, 1, 2, 0]  # (d_l, h_l, w_l, d_r, h_r, w_r): asymmetric both ways on purpose


@pytest.mark.parametrize("with_weights", [True, False], ids=["weights", "no-weights"])
def test_opcheck(with_weights, device):
    x, f, b = CP(2, 3, 4, (5, 4, 6), (3, 2, 3), 3, weights=with_weights).tensors(device=device)
    args = ([1, 2, 1], PAD, [1, 1, 2])
    op = torch.ops.lk3d.cp_conv3d.default
    torch.library.opcheck(op, (x, *f.tensors(), b, *args))
    grads = [None if t is None else t.detach().clone().requires_grad_()
             for t in (x, *f.tensors(), b)]
    torch.library.opcheck(op, (*grads, *args))
    y = op(x, *f.tensors(), b, *args)
    gy = torch.randn_like(y)
    backward = torch.ops.lk3d.cp_conv3d_backward.default
    for mask in ([True] * 7, [False, True, False, False, True, False, True]):
        torch.library.opcheck(backward, (gy, x, *f.tensors(), *args, mask))


class CPBlock(nn.Module):
    """A CP conv between two pointwise nonlinearities, its factors built inside ``forward``."""

    def __init__(self):
        super().__init__()
        _, f, b = CASES[5].tensors()
        self.factors = nn.ParameterList([nn.Parameter(t.clone()) for t in f.tensors()])
        self.bias = nn.Parameter(b.clone())

    def forward(self, x):
        y = lk3d.cp_conv3d(torch.tanh(x), lk3d.CPFactors(*self.factors), self.bias,
                           padding="same", dilation=(1, 2, 1))
        return F.gelu(y)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    model = CPBlock()
    x = CASES[5].tensors()[0].requires_grad_()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    y_eager, y_comp = model(x), compiled(x)
    assert_close_rel("output", y_comp, y_eager, TOL[torch.float64])
    gy = torch.randn_like(y_eager)
    params = [x, *model.parameters()]
    for a, b in zip(torch.autograd.grad(y_comp, params, gy),
                    torch.autograd.grad(y_eager, params, gy)):
        assert_close_rel("grad", a, b, TOL[torch.float64])


def test_compile_sees_one_node():
    x, f, b = CASES[1].tensors()
    assert_one_node(lambda x, f: lk3d.cp_conv3d(x, f, b, **CASES[1].args()), x, f,
                    op="lk3d.cp_conv3d")


# ---------------------------------------------------------------------------------------------
# fuzz
# ---------------------------------------------------------------------------------------------

@st.composite
def cp_cases(draw):
    return CP(N=draw(st.sampled_from([None, 1, 2])), cin=draw(st.integers(1, 5)),
              cout=draw(st.integers(1, 5)), rank=draw(st.integers(1, 32)),
              **draw_geometry(draw, max_kernel=5, slack=4), bias=draw(st.booleans()),
              weights=draw(st.booleans()),
              layout=draw(st.sampled_from(["contiguous", "channels_last_3d"])))


@given(case=cp_cases(), seed=st.integers(0, 2 ** 16), strided_bias=st.booleans())
def test_fuzz_matches_dense(case, seed, strided_bias):
    _fuzz(case, seed, strided_bias)


# ~0.2 s an example through the kernels under the interpreter.
@settings(max_examples=80)
@given(case=cp_cases(), seed=st.integers(0, 2 ** 16), strided_bias=st.booleans())
def test_fuzz_kernels_match_dense(case, seed, strided_bias):
    cp_ops.USE_KERNELS = True  # the autouse fixture restores it
    _fuzz(case, seed, strided_bias)


def _fuzz(case, seed, strided_bias):
    from conftest import DEVICE
    if case.N is None and case.layout != "contiguous":
        case = replace(case, layout="contiguous")
    x, factors, bias = case.tensors(seed=seed, device=DEVICE)
    if strided_bias and bias is not None:
        bias = strided_copy(bias)
    names, leaves, rebuild = _leaves(x, factors, bias)
    got = lk3d.cp_conv3d(*rebuild(leaves), **case.args())
    lx, lf, lb = rebuild(leaves)
    want = F.conv3d(lx, lf.to_dense(), lb, **case.args())
    assert_close_rel(f"output {case.id}", got, want, TOL[torch.float64])
    grad = torch.randn_like(want)
    for name, g, w in zip(names, torch.autograd.grad(got, leaves, grad),
                          torch.autograd.grad(want, leaves, grad)):
        assert_close_rel(f"grad {name} {case.id}", g, w, 1e-10)
