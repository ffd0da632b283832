"""Rank-R CP convolution: ``lk3d.CPFactors``, ``lk3d.cp_conv3d`` against ``F.conv3d`` with the
reconstructed dense kernel (float64, every argument form, ranks 1 to 32, non-cubic kernels),
gradients (gradcheck, and against autograd through the dense kernel), the ``lk3d::cp_conv3d``
ops (opcheck, ``torch.compile(fullgraph=True)``), a hypothesis fuzz, argument errors, and
``lk3d.nn.CPConv3d`` / ``lk3d.nn.convert(to="cp")``.

Every test here runs the torch path, the factored sequence (``lk3d.cp.USE_KERNELS`` is switched
off by an autouse fixture): it is what CPU users get without the interpreter. The fuzz runs both
that path and the Triton kernels (under the interpreter on the CPU); the kernels have their own
tests in test_cp_kernel.py.
"""
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lk3d
from _cases import TOL, draw_geometry, leaf_like, rel_err, strided_copy
from lk3d import cp as cp_ops
from lk3d.cp import cp_conv3d_ref

FACTOR_NAMES = ("U_out", "U_in", "A", "B", "C", "weights")


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    monkeypatch.setattr(cp_ops, "USE_KERNELS", False)


@dataclass(frozen=True)
class CPCase:
    N: object  # None: unbatched input
    cin: int
    cout: int
    size: tuple
    kernel: tuple
    rank: int
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    bias: bool = True
    weights: bool = True
    layout: str = "contiguous"

    @property
    def id(self):
        def j(v):
            return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)
        batch = "unbatched" if self.N is None else f"N{self.N}"
        return (f"{batch}-C{self.cin}to{self.cout}-D{j(self.size)}-k{j(self.kernel)}-r{self.rank}"
                f"-s{j(self.stride)}-p{j(self.padding)}-d{j(self.dilation)}"
                f"{'' if self.bias else '-nobias'}{'' if self.weights else '-noweights'}"
                f"{'' if self.layout == 'contiguous' else '-' + self.layout}")

    def tensors(self, dtype=torch.float64, seed=0, device="cpu"):
        """``(x, factors, bias)`` drawn on the CPU, then moved to ``device``."""
        g = torch.Generator().manual_seed(seed)
        batch = () if self.N is None else (self.N,)
        x = torch.randn(*batch, self.cin, *self.size, generator=g, dtype=torch.float64)
        if self.layout == "channels_last_3d":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        rows = (self.cout, self.cin, *self.kernel)
        mats = [torch.randn(n, self.rank, generator=g, dtype=torch.float64) for n in rows]
        w = torch.rand(self.rank, generator=g, dtype=torch.float64) + 0.5 if self.weights else None
        b = torch.randn(self.cout, generator=g, dtype=torch.float64) if self.bias else None
        to = dict(dtype=dtype, device=device)
        return x.to(**to), lk3d.CPFactors(*mats, w).to(**to), None if b is None else b.to(**to)

    def args(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation)


CASES = [
    CPCase(2, 3, 4, (7, 9, 5), (3, 5, 3), 1, padding=(1, 2, 0)),
    CPCase(1, 4, 6, (9, 7, 8), (3, 3, 2), 4, stride=(2, 1, 3), padding=1, dilation=(1, 2, 1)),
    CPCase(2, 5, 3, (11, 7, 6), (7, 3, 5), 8, padding="same"),
    CPCase(1, 2, 2, (23, 5, 7), (21, 1, 3), 3, padding="same", bias=False),
    CPCase(1, 3, 2, (5, 23, 6), (1, 21, 3), 2, padding="valid", weights=False),
    # Even kernel sides with "same": asymmetric padding (one more on the right).
    CPCase(1, 3, 5, (6, 7, 5), (4, 2, 3), 6, padding="same", dilation=(1, 2, 1)),
    CPCase(1, 4, 4, (13, 11, 7), (2, 2, 2), 16, stride=3),
    CPCase(2, 6, 8, (9, 9, 9), (5, 5, 5), 32, padding=2, dilation=2),
    CPCase(2, 3, 3, (10, 9, 8), (3, 2, 4), 12, stride=(1, 2, 2), padding="valid",
           dilation=(2, 1, 1)),
    CPCase(None, 3, 4, (5, 6, 7), (3, 3, 3), 5, padding=1),
    CPCase(2, 4, 3, (6, 5, 7), (3, 1, 5), 7, padding=(1, 0, 2), layout="channels_last_3d"),
    CPCase(1, 1, 1, (4, 4, 4), (1, 1, 1), 2, weights=False),
]


def assert_close_rel(name, got, want, tol):
    err = rel_err(got, want)
    assert err < tol, f"{name}: relative error {err:.3g} >= {tol:g}"


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
    CPCase(1, 2, 3, (4, 5, 3), (2, 3, 2), 2, padding="same", dilation=(1, 1, 2)),
    CPCase(2, 2, 2, (5, 4, 6), (3, 2, 3), 3, stride=(2, 1, 2), padding=(1, 0, 1)),
    CPCase(None, 2, 2, (4, 4, 4), (3, 3, 1), 2, padding="valid", weights=False),
], ids=lambda c: c.id)
def test_gradcheck(case, device):
    x, factors, bias = case.tensors(device=device)
    _, leaves, rebuild = _leaves(x, factors, bias)
    assert torch.autograd.gradcheck(lambda *t: lk3d.cp_conv3d(*rebuild(t), **case.args()),
                                    leaves)


def test_cuda_cost_model_prefers_the_sequence_at_large_kernels(monkeypatch):
    """The plan's CUDA model: the fused kernels (2·k³·Cin·R FLOPs per voxel) win at a 3³ kernel,
    the factored sequence (memory-bound) at 21³; the backward costs more than the forward."""
    from lk3d import _algos
    monkeypatch.setattr(_algos, "_cuda_rate", lambda device, dtype: 1e15)
    cuda = torch.device("cuda")

    def ms(algo, k, backward=False):
        return cp_ops.model_ms(algo, [1, 64, 64, 64, 64], 64, 16, (k,) * 3, [1, 1, 1],
                               [k // 2] * 6, [1, 1, 1], torch.bfloat16, cuda, backward)
    assert ms("tiled", 3) < ms("aten", 3)
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


# ---------------------------------------------------------------------------------------------
# CPFactors
# ---------------------------------------------------------------------------------------------

def test_factors_container():
    x, f, _ = CASES[2].tensors()
    assert f.rank == 8 and f.kernel_size == (7, 3, 5)
    assert (f.out_channels, f.in_channels) == (3, 5)
    assert f.dtype == torch.float64 and f.device == torch.device("cpu")
    dense = f.to_dense()
    assert dense.shape == (3, 5, 7, 3, 5)
    o, i, a, b, c = 2, 4, 6, 1, 3
    want = sum(f.U_out[o, r] * f.weights[r] * f.U_in[i, r] * f.A[a, r] * f.B[b, r] * f.C[c, r]
               for r in range(f.rank))
    torch.testing.assert_close(dense[o, i, a, b, c], want)
    assert f.to(torch.float32).dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in f.to(torch.float32).tensors())
    assert "rank=8" in repr(f) and "kernel_size=(7, 3, 5)" in repr(f)
    with pytest.raises(AttributeError):
        f.rank = 3


def _mats(rows=(4, 3, 3, 5, 2), rank=2, **kw):
    return [torch.randn(n, rank, **kw) for n in rows]


FACTOR_ERRORS = [  # (U_out, U_in, A, B, C, weights), error, what the message names
    ((*_mats(rank=0), None), ValueError, ["rank", "at least 1"]),
    ((*_mats()[:4], torch.randn(2, 3), None), ValueError, ["rank", "C (2, 3)", "U_out (4, 2)"]),
    ((torch.randn(4, 2, 1), *_mats()[1:], None), ValueError, ["U_out", "2-D", "(4, 2, 1)"]),
    ((*_mats()[:2], torch.randn(0, 2), *_mats()[3:], None), ValueError, ["A", "(0, 2)"]),
    ((*_mats(), torch.randn(3)), ValueError, ["weights", "(2,)", "(3,)"]),
    ((*_mats()[:3], torch.randn(5, 2, dtype=torch.float64), torch.randn(2, 2), None), TypeError,
     ["B", "float32", "float64"]),
    ((*_mats()[:4], torch.randn(2, 2, device="meta"), None), ValueError,
     ["C", "cpu", "meta"]),
    ((*_mats()[:1], torch.ones(3, 2, dtype=torch.int64), *_mats()[2:], None), TypeError,
     ["U_in", "int64"]),
    ((*_mats()[:4], [[1.0, 2.0]], None), TypeError, ["C", "list"]),
]


@pytest.mark.parametrize("tensors, error, names", FACTOR_ERRORS,
                         ids=["rank0", "ranks-disagree", "3d", "empty-A", "weights-shape",
                              "dtype", "device", "int", "list"])
def test_factors_errors(tensors, error, names):
    with pytest.raises(error) as info:
        lk3d.CPFactors(*tensors)
    for name in names:
        assert name in str(info.value), f"{name!r} not in {str(info.value)!r}"


def _call_errors():
    x, f, b = CPCase(1, 3, 4, (5, 6, 7), (3, 3, 3), 2).tensors()
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
    with pytest.raises(error) as info:
        lk3d.cp_conv3d(**kwargs)
    for name in names:
        assert name in str(info.value), f"{name!r} not in {str(info.value)!r}"


# ---------------------------------------------------------------------------------------------
# the custom ops: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------

PAD = [1, 0, 1, 1, 2, 0]  # (d_l, h_l, w_l, d_r, h_r, w_r): asymmetric both ways on purpose


@pytest.mark.parametrize("with_weights", [True, False], ids=["weights", "no-weights"])
def test_opcheck(with_weights, device):
    x, f, b = CPCase(2, 3, 4, (5, 4, 6), (3, 2, 3), 3, weights=with_weights).tensors(device=device)
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
    torch._dynamo.reset()
    x, f, b = CASES[1].tensors()
    counts = torch._dynamo.explain(lambda x, f: lk3d.cp_conv3d(x, f, b, **CASES[1].args()))(x, f)
    assert counts.graph_break_count == 0 and counts.graph_count == 1
    nodes = [str(n.target) for g in counts.graphs for n in g.graph.nodes]
    assert sum("lk3d.cp_conv3d" in n for n in nodes) == 1, nodes


# ---------------------------------------------------------------------------------------------
# fuzz
# ---------------------------------------------------------------------------------------------

@st.composite
def cp_cases(draw):
    return CPCase(N=draw(st.sampled_from([None, 1, 2])), cin=draw(st.integers(1, 5)),
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
        case = CPCase(**{**case.__dict__, "layout": "contiguous"})
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


# ---------------------------------------------------------------------------------------------
# lk3d.nn.CPConv3d and convert(to="cp")
# ---------------------------------------------------------------------------------------------

MODULE_CASES = [  # (module arguments, input shape)
    (dict(in_channels=3, out_channels=4, kernel_size=(3, 5, 3), rank=4, padding=(1, 2, 1),
          dilation=(1, 1, 2)), (2, 3, 7, 5, 6)),
    (dict(in_channels=2, out_channels=3, kernel_size=3, rank=2, stride=2, padding=1,
          bias=False), (1, 2, 7, 7, 5)),
    (dict(in_channels=3, out_channels=2, kernel_size=(3, 5, 4), rank=5, padding="same",
          padding_mode="reflect"), (2, 3, 5, 7, 6)),
    (dict(in_channels=2, out_channels=2, kernel_size=(5, 3, 3), rank=3, stride=2,
          padding=(2, 1, 1), padding_mode="replicate"), (1, 2, 7, 6, 5)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, rank=6, padding=(1, 1, 2),
          padding_mode="circular"), (3, 5, 7, 6)),  # unbatched
]


@pytest.mark.parametrize("args, shape", MODULE_CASES,
                         ids=[f"{a.get('padding_mode', 'zeros')}-{a['padding']}-r{a['rank']}"
                              for a, _ in MODULE_CASES])
def test_module_matches_torch_conv(args, shape):
    torch.manual_seed(0)
    mod = lk3d.nn.CPConv3d(**args, dtype=torch.float64)
    ref_args = {k: v for k, v in args.items() if k != "rank"}
    ref = nn.Conv3d(**ref_args, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(mod.factors.to_dense())
        if ref.bias is not None:
            ref.bias.copy_(mod.bias)
    x = torch.randn(shape, dtype=torch.float64)
    assert_close_rel("output", mod(x), ref(x), TOL[torch.float64])
    names = [n for n, _ in mod.named_parameters()]
    assert names == ["U_out", "U_in", "A", "B", "C"] + (["bias"] if mod.bias is not None else [])
    assert f"rank={args['rank']}" in repr(mod) and repr(mod).startswith("CPConv3d(")


@pytest.mark.parametrize("rank", [1, 8, 32])
def test_module_init_variance_matches_conv3d(rank):
    """Dense weight elements and outputs have nn.Conv3d's default variance, 1/(3·fan_in)."""
    torch.manual_seed(0)
    cin, cout, kernel = 6, 5, (3, 5, 2)
    fan_in = cin * 3 * 5 * 2
    x = torch.randn(4, cin, 6, 7, 5, dtype=torch.float64)
    w2 = y2 = y2_ref = 0.0
    draws = 1000  # products of five uniforms are heavy-tailed: ±4% spread at rank 1
    for _ in range(draws):
        mod = lk3d.nn.CPConv3d(cin, cout, kernel, rank, bias=False, dtype=torch.float64)
        ref = nn.Conv3d(cin, cout, kernel, bias=False, dtype=torch.float64)
        with torch.no_grad():
            w2 += mod.factors.to_dense().square().mean().item() / draws
            y2 += mod(x).square().mean().item() / draws
            y2_ref += ref(x).square().mean().item() / draws
    assert w2 == pytest.approx(1 / (3 * fan_in), rel=0.1)
    assert y2 == pytest.approx(y2_ref, rel=0.1)


def test_module_compiles_to_one_node():
    torch._dynamo.reset()
    args, shape = MODULE_CASES[2]  # reflect padding: an F.pad, then lk3d::cp_conv3d
    mod = lk3d.nn.CPConv3d(**args, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    counts = torch._dynamo.explain(mod)(x)
    assert counts.graph_break_count == 0 and counts.graph_count == 1
    nodes = [str(n.target) for g in counts.graphs for n in g.graph.nodes]
    assert sum("lk3d.cp_conv3d" in n for n in nodes) == 1, nodes
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    assert_close_rel("output", compiled(x), mod(x), TOL[torch.float64])


def test_module_argument_errors():
    with pytest.raises(ValueError, match="rank"):
        lk3d.nn.CPConv3d(2, 2, 3, rank=0)
    with pytest.raises(TypeError, match="rank"):
        lk3d.nn.CPConv3d(2, 2, 3, rank=2.0)
    with pytest.raises(ValueError, match="padding_mode"):
        lk3d.nn.CPConv3d(2, 2, 3, 2, padding_mode="mirror")
    with pytest.raises(ValueError, match="'same' expects stride 1"):
        lk3d.nn.CPConv3d(2, 2, 3, 2, stride=2, padding="same")
    with pytest.raises(TypeError, match="kernel_size"):
        lk3d.nn.CPConv3d(2, 2, (3, 3), 2)
    with pytest.raises(ValueError, match="groups=1"):
        lk3d.nn.CPConv3d.from_conv(nn.Conv3d(4, 4, 3, groups=2), 2)
    with pytest.raises(TypeError, match="conv"):
        lk3d.nn.CPConv3d.from_conv(nn.Conv2d(4, 4, 3), 2)


def _exact_rank_conv(cin, cout, kernel, rank, seed, **kwargs):
    """An nn.Conv3d whose weight has CP rank ``rank`` exactly."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv3d(cin, cout, kernel, **kwargs, dtype=torch.float64)
    mats = [torch.randn(n, rank, generator=g, dtype=torch.float64)
            for n in (cout, cin, *conv.kernel_size)]
    with torch.no_grad():
        conv.weight.copy_(lk3d.CPFactors(*mats).to_dense() / 10)
    return conv


def test_from_conv():
    conv = _exact_rank_conv(3, 4, (5, 3, 4), 3, seed=1, padding=(2, 1, 1), stride=(1, 2, 1),
                            padding_mode="replicate")
    conv.eval()
    conv.bias.requires_grad_(False)
    mod = lk3d.nn.CPConv3d.from_conv(conv, 3)
    assert mod.decomposition_error < 1e-6
    assert (mod.stride, mod.padding, mod.padding_mode) == ((1, 2, 1), (2, 1, 1), "replicate")
    assert not mod.training and not mod.bias.requires_grad and mod.U_in.requires_grad
    assert mod.U_out.dtype == torch.float64
    # The component scales are spread evenly: every factor's columns have the same norm.
    norms = torch.stack([getattr(mod, n).norm(dim=0) for n in ("U_out", "U_in", "A", "B", "C")])
    torch.testing.assert_close(norms, norms[:1].expand_as(norms))
    x = torch.randn(2, 3, 6, 7, 5, dtype=torch.float64)
    assert_close_rel("output", mod(x), conv(x), 1e-6)


class Net(nn.Module):
    """A 3³ conv, a shared 5³ conv used twice, a depthwise 7³ conv, a lk3d.nn.Conv3d."""

    def __init__(self):
        super().__init__()
        self.stem = _exact_rank_conv(2, 2, 3, 2, seed=1, padding=1)
        shared = _exact_rank_conv(2, 2, 5, 2, seed=2, padding=2)
        self.body = nn.Sequential(shared, nn.ReLU(), shared)
        self.dw = nn.Conv3d(2, 2, 7, padding=3, groups=2, dtype=torch.float64)
        self.head = lk3d.nn.convert(_exact_rank_conv(2, 3, (1, 1, 5), 2, seed=3,
                                                     padding=(0, 0, 2)))

    def forward(self, x):
        return self.head(self.dw(self.body(self.stem(x))))


def test_convert_to_cp():
    torch.manual_seed(0)
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = lk3d.nn.convert(net, to="cp", rank=2)
    assert out is not net
    assert type(out.stem) is nn.Conv3d  # 3 < min_kernel_size
    assert type(out.body[0]) is lk3d.nn.CPConv3d and out.body[0] is out.body[2]
    assert type(out.dw) is nn.Conv3d  # grouped: left alone
    assert type(out.head) is lk3d.nn.CPConv3d and out.head.rank == 2
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    x = torch.randn(1, 2, 6, 5, 7, dtype=torch.float64)
    assert_close_rel("output", out(x), net(x), 1e-6)

    inplace = lk3d.nn.convert(net, min_kernel_size=3, inplace=True, to="cp", rank=2)
    assert inplace is net and type(net.stem) is lk3d.nn.CPConv3d
    with pytest.warns(UserWarning, match="relative error"):  # a random 5³ weight at rank 3
        bare = lk3d.nn.convert(nn.Conv3d(2, 2, 5), to="cp", rank=3)
    assert type(bare) is lk3d.nn.CPConv3d
    assert type(lk3d.nn.convert(nn.Conv3d(4, 4, 5, groups=2), to="cp", rank=3)) is nn.Conv3d


@pytest.mark.parametrize("kwargs, error, names", [
    (dict(to="cp"), ValueError, ["rank", "to='cp'", "None"]),
    (dict(to="cp", rank=0), ValueError, ["rank", "0"]),
    (dict(to="cp", rank=2.5), TypeError, ["rank", "2.5"]),
    (dict(to="dense", rank=4), ValueError, ["rank", "to='dense'"]),
    (dict(to="tucker", rank=4), ValueError, ["to", "'cp'", "'tucker'"]),
], ids=["no-rank", "rank0", "rank-float", "dense-rank", "tucker"])
def test_convert_cp_bad_arguments(kwargs, error, names):
    net = Net()
    with pytest.raises(error) as info:
        lk3d.nn.convert(net, **kwargs)
    for name in names:
        assert name in str(info.value), f"{name!r} not in {str(info.value)!r}"
