"""Block-sparse convolution (``lk3d.block_sparse``): ``lk3d.block_sparse_conv3d`` against
``F.conv3d`` with the dense weight (float64, every argument form, groups and depthwise with
multiplier, block shapes from channel blocks per tap to tap bricks, densities from no stored block
to all), gradients (gradcheck, and against autograd through the dense weight), the work count of
the torch path, the ``lk3d::block_sparse_conv3d`` ops (opcheck,
``torch.compile(fullgraph=True)``), a hypothesis fuzz and argument errors.

Every test here runs the torch path (``lk3d.block_sparse.USE_KERNELS`` is switched off by an
autouse fixture) but for the gradcheck and the fuzz, which run both the torch path and the Triton
kernels (the interpreter on the CPU); the kernels have their own tests beside them. The fixture
also forces the torch path's sparse route (``ROUTE = "sparse"``); its dense route and the cost
model that picks between them have their own tests. The weight format, ``lk3d.BlockSparseWeight``,
is tested in test_block_sparse_weight.py.
"""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lk3d
from _cases import (TOL, Case, assert_close_rel, assert_one_node, draw_geometry, leaf_like,
                    raises_naming, strided_copy)
from lk3d import block_sparse

BS = Case.block_sparse


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    monkeypatch.setattr(block_sparse, "USE_KERNELS", False)
    monkeypatch.setattr(block_sparse, "ROUTE", "sparse")


CASES = [
    # channel blocks per tap
    BS(2, 8, 8, (7, 9, 5), (3, 5, 3), (4, 4, 1, 1, 1), padding=(1, 2, 0)),
    BS(1, 6, 4, (9, 7, 8), (3, 3, 2), (2, 3, 1, 1, 1), 0.3, stride=(2, 1, 3), padding=1,
       dilation=(1, 2, 1)),
    # tap bricks, mixed blocks
    BS(2, 4, 6, (11, 7, 6), (7, 3, 5), (3, 2, 7, 1, 5), 0.5, padding="same"),
    BS(1, 6, 6, (6, 7, 5), (4, 2, 3), (2, 3, 2, 2, 1), 0.4, padding="same",
       dilation=(1, 2, 1)),
    BS(1, 5, 3, (13, 11, 7), (2, 2, 2), (1, 5, 2, 1, 2), 0.6, stride=3),
    BS(2, 3, 5, (5, 23, 6), (1, 21, 3), (5, 1, 1, 7, 3), 0.5, padding="valid"),
    # groups: block rows inside a group
    BS(2, 6, 12, (7, 6, 5), (3, 3, 3), (3, 3, 1, 3, 1), 0.5, padding=1, groups=2),
    BS(3, 4, 6, (5, 6, 7), (3, 3, 3), (3, 1, 1, 1, 3), 0.7, stride=(1, 2, 2),
       padding=(0, 1, 2), groups=2),
    # depthwise, with multiplier; rows spanning groups are allowed there
    BS(2, 4, 4, (9, 7, 8), (5, 3, 3), (4, 1, 1, 3, 1), 0.5, stride=2, padding=(2, 1, 1),
       dilation=(1, 2, 2), groups=4),
    BS(1, 3, 6, (11, 7, 5), (7, 3, 5), (3, 1, 7, 1, 5), 0.5, padding="same", groups=3),
    BS(1, 4, 12, (7, 9, 5), (3, 3, 3), (12, 1, 1, 3, 1), 0.5, padding="same", groups=4),
    BS(1, 5, 5, (13, 11, 9), (3, 3, 3), (5, 1, 1, 1, 1), 0.8, padding=3, dilation=3,
       groups=5),
    # every block; no block; one block covering the whole weight
    BS(2, 4, 4, (6, 5, 7), (3, 1, 5), (2, 2, 3, 1, 1), 1.0, padding=(1, 0, 2)),
    BS(2, 4, 4, (6, 5, 7), (3, 3, 3), (2, 2, 1, 1, 1), 0, padding=1),
    BS(1, 3, 2, (5, 4, 6), (2, 3, 2), (2, 3, 2, 3, 2), 1.0, padding="same", bias=False),
    # unbatched; channels_last_3d; 1x1x1
    BS(None, 4, 6, (5, 6, 7), (3, 3, 3), (3, 2, 1, 3, 1), 0.5, padding=1),
    BS(2, 4, 6, (6, 5, 7), (3, 1, 5), (2, 4, 1, 1, 5), 0.5, padding=(1, 0, 2),
       layout="channels_last_3d"),
    BS(2, 6, 4, (4, 5, 3), (1, 1, 1), (2, 2, 1, 1, 1), 0.5),
]


def _leaves(x, ws, bias):
    """Fresh leaf copies (input, values, bias) requiring grad, and a function of them giving
    ``(x, weight, bias)``."""
    tensors = [x, ws.values] + ([bias] if bias is not None else [])
    leaves = [leaf_like(t) for t in tensors]
    names = ["input", "values", "bias"][:len(leaves)]

    def rebuild(leaves):
        x, v, *b = leaves
        return x, lk3d.BlockSparseWeight(ws.shape, ws.block_shape, v, ws.row_ptr, ws.col), \
            (b[0] if b else None)
    return names, leaves, rebuild


def _check_against_dense(case, x, ws, bias, tol=TOL[torch.float64], grad_tol=1e-10):
    names, leaves, rebuild = _leaves(x, ws, bias)
    got = lk3d.block_sparse_conv3d(*rebuild(leaves), **case.args())
    lx, lw, lb = rebuild(leaves)
    want = F.conv3d(lx, lw.to_dense(), lb, **case.args())
    assert got.shape == want.shape
    assert_close_rel(f"output {case.id}", got, want, tol)
    grad = torch.randn_like(want)
    for name, g, w in zip(names, torch.autograd.grad(got, leaves, grad),
                          torch.autograd.grad(want, leaves, grad)):
        assert g.shape == w.shape, name
        assert_close_rel(f"grad {name} {case.id}", g, w, grad_tol)
    return got


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_dense_conv3d(case, device):
    x, ws, bias = case.tensors(device=device)
    before = [t.clone() for t in (x, ws.values, ws.row_ptr, ws.col)]
    got = _check_against_dense(case, x, ws, bias)
    if case.layout == "channels_last_3d":
        assert got.is_contiguous(memory_format=torch.channels_last_3d)
    for t, b in zip((x, ws.values, ws.row_ptr, ws.col), before):
        assert torch.equal(t, b), "an input was changed"


@pytest.mark.parametrize("case", [CASES[i] for i in (0, 1, 3, 6, 8, 10, 13)],
                         ids=lambda c: c.id)
def test_dense_route_matches_dense_conv3d(case, device, monkeypatch):
    """The dense route (the dense conv of to_dense(), by aten or FFT) gives the same output and
    gradients, the stored blocks' part of the dense weight gradient included."""
    monkeypatch.setattr(block_sparse, "ROUTE", "dense")
    x, ws, bias = case.tensors(device=device)
    assert block_sparse.explain(x, ws, bias, **case.args())["route"] == "dense"
    _check_against_dense(case, x, ws, bias)


def test_route_follows_the_cost_model(monkeypatch):
    """"auto" takes the route with the smaller modelled time: the sparse one for a few large
    bricks, the dense one for many small channel blocks at full density; both give the same
    result."""
    monkeypatch.setattr(block_sparse, "ROUTE", "auto")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 32, 12, 12, 12, generator=g, dtype=torch.float64)
    w = torch.randn(32, 32, 8, 8, 8, generator=g, dtype=torch.float64)
    bricks = lk3d.BlockSparseWeight.from_dense(w, (32, 32, 4, 4, 4), density=0.125)
    small = lk3d.BlockSparseWeight.from_dense(w[:, :, :3, :3, :3], (2, 2, 1, 1, 1))
    plans = {}
    for name, ws in (("bricks", bricks), ("small", small)):
        plan = block_sparse.explain(x, ws, padding="same")
        assert plan["path"] == "torch" and set(plan["times_ms"]) == {"sparse", "dense"}
        times = plan["times_ms"]
        assert plan["route"] == min(times, key=times.get)
        assert (plan["algo"] is None) == (plan["route"] == "sparse")
        plans[name] = plan["route"]
        got = lk3d.block_sparse_conv3d(x, ws, padding="same")
        assert_close_rel(name, got, F.conv3d(x, ws.to_dense(), padding="same"),
                         TOL[torch.float64])
    assert plans == {"bricks": "sparse", "small": "dense"}
    monkeypatch.setattr(block_sparse, "ROUTE", "sideways")
    with pytest.raises(ValueError, match="ROUTE"):
        lk3d.block_sparse_conv3d(x, small, padding="same")


def test_no_stored_block_gives_the_bias():
    case = CASES[13]
    x, ws, bias = case.tensors()
    assert ws.nnz == 0 and ws.density == 0
    names, leaves, rebuild = _leaves(x, ws, bias)
    y = lk3d.block_sparse_conv3d(*rebuild(leaves), **case.args())
    torch.testing.assert_close(y, bias.view(1, -1, 1, 1, 1).expand_as(y), rtol=0, atol=0)
    gx, gv, gb = torch.autograd.grad(y.sum(), leaves)
    assert gx.abs().max() == 0 and gv.shape == (0, 2, 2, 1, 1, 1)
    assert torch.equal(gb, torch.full_like(bias, y[:, 0].numel()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[-1])
def test_low_precision(dtype):
    case = CASES[2]
    x, ws, bias = case.tensors()
    want = F.conv3d(x, ws.to_dense(), bias, **case.args())
    xl, wl, bl = case.tensors(dtype)
    got = lk3d.block_sparse_conv3d(xl.requires_grad_(), wl, bl, **case.args())
    assert got.dtype == dtype
    assert_close_rel("output", got, want, 4 * TOL[dtype])
    got.sum().backward()
    assert xl.grad.dtype == dtype


@pytest.mark.parametrize("case", [
    BS(1, 4, 4, (3, 4, 3), (2, 3, 2), (2, 2, 1, 3, 1), 0.5, padding="same",
       dilation=(1, 1, 2)),
    BS(2, 4, 4, (4, 3, 4), (3, 2, 3), (2, 1, 1, 1, 3), 0.5, stride=(2, 1, 2),
       padding=(1, 0, 1), groups=2),
    BS(None, 2, 4, (4, 3, 3), (3, 3, 1), (4, 1, 1, 1, 1), 0.5, padding="valid", groups=2),
], ids=lambda c: c.id)
@pytest.mark.parametrize("path", ["torch", "kernels"])
def test_gradcheck(case, path, device):
    block_sparse.USE_KERNELS = path == "kernels"  # the autouse fixture restores it
    x, ws, bias = case.tensors(device=device)
    _, leaves, rebuild = _leaves(x, ws, bias)
    # The full Jacobian costs two calls per element: fast mode (random projections) on the
    # larger cases, and for the kernels (the interpreter on the CPU).
    fast = path == "kernels" or x.numel() + ws.values.numel() > 200
    assert torch.autograd.gradcheck(
        lambda *t: lk3d.block_sparse_conv3d(*rebuild(t), **case.args()), leaves,
        fast_mode=fast)


@pytest.mark.parametrize("wanted", [(0,), (1,), (2,), (0, 2), (1, 2)],
                         ids=lambda w: "+".join(["input", "values", "bias"][i] for i in w))
def test_partial_gradients(wanted):
    case = CASES[6]
    x, ws, bias = case.tensors()
    names, leaves, rebuild = _leaves(x, ws, bias)
    for i, leaf in enumerate(leaves):
        leaf.requires_grad_(i in wanted)
    chosen = [leaves[i] for i in wanted]
    got = lk3d.block_sparse_conv3d(*rebuild(leaves), **case.args())
    lx, lw, lb = rebuild(leaves)
    want = F.conv3d(lx, lw.to_dense(), lb, **case.args())
    grad = torch.randn_like(want)
    for i, g, w in zip(wanted, torch.autograd.grad(got, chosen, grad),
                       torch.autograd.grad(want, chosen, grad)):
        assert_close_rel(f"grad {names[i]}", g, w, 1e-10)


def test_empty_batch():
    x, ws, bias = CASES[1].tensors()
    x = x[:0].requires_grad_()
    y = lk3d.block_sparse_conv3d(x, ws, bias, **CASES[1].args())
    assert y.shape[0] == 0 and y.shape[1] == 4
    y.sum().backward()
    assert x.grad.shape == x.shape


# ---------------------------------------------------------------------------------------------
# the work count
# ---------------------------------------------------------------------------------------------

def test_work_falls_with_density():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 9, 9, 9, generator=g, dtype=torch.float64)
    w = torch.randn(8, 8, 5, 5, 5, generator=g, dtype=torch.float64)
    out = 2 * 9 ** 3  # N · voxels with padding="same"
    dense = 8 * 8 * 125 * out
    work = []
    for density in (1.0, 0.5, 0.25, 0.1):
        ws = lk3d.BlockSparseWeight.from_dense(w, (4, 4, 1, 1, 1), density=density)
        macs = lk3d.block_sparse.block_sparse_conv3d_macs(x, ws, padding="same")
        assert macs == ws.nnz * 16 * out
        work.append(macs)
    assert work[0] == dense
    assert work == sorted(work, reverse=True) and len(set(work)) == len(work)
    assert work[-1] == pytest.approx(0.1 * dense, rel=0.01)
    none = lk3d.BlockSparseWeight.from_dense(w, (4, 4, 1, 1, 1), threshold=math.inf)
    assert lk3d.block_sparse.block_sparse_conv3d_macs(x, none, padding="same") == 0


def _call_errors():
    case = BS(1, 4, 4, (5, 6, 7), (3, 3, 3), (2, 2, 1, 1, 1), 0.5)
    x, ws, b = case.tensors()
    return [
        (dict(weight=ws.to_dense()), TypeError, ["weight", "BlockSparseWeight", "Tensor"]),
        (dict(input=x[:, :3]), ValueError, ["weight", "shape[1]", "3"]),
        (dict(input=x[0, 0]), ValueError, ["input", "4-D or 5-D", "3-D"]),
        (dict(input=x.float()), TypeError, ["weight", "float32", "float64"]),
        (dict(weight=ws.to("meta")), ValueError, ["weight", "cpu", "meta"]),
        (dict(bias=b[:3]), ValueError, ["bias", "(4,)", "(3,)"]),
        (dict(bias=b.float()), TypeError, ["bias", "float64", "float32"]),
        (dict(bias=b.to("meta")), ValueError, ["bias", "cpu", "meta"]),
        (dict(groups=3), ValueError, ["groups", "4 channels", "3"]),
        (dict(groups=2), ValueError, ["weight", "shape[1]", "2"]),
        (dict(groups=1.0), TypeError, ["groups", "1.0"]),
        # groups=2 with 3 output channels per group: a block row of 2 would span two groups
        (dict(weight=_regrouped(), bias=None, groups=2), ValueError,
         ["block_shape", "bo = 2", "group of 3"]),
        (dict(stride=0), ValueError, ["stride", "positive"]),
        (dict(stride=2, padding="same"), ValueError, ["padding", "'same'", "stride"]),
        (dict(padding="full"), ValueError, ["padding", "'full'"]),
        (dict(padding=(1, 2)), TypeError, ["padding", "(1, 2)"]),
        (dict(dilation=3), ValueError, ["weight", "kernel extent", "(7, 7, 7)"]),
    ], (x, ws, b)


def _regrouped():
    """A weight [6, 2, 3, 3, 3] in blocks of bo=2: fine for groups=1, not for groups=2."""
    w = torch.randn(6, 2, 3, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return lk3d.BlockSparseWeight.from_dense(w, (2, 2, 1, 1, 1))


@pytest.mark.parametrize("index", range(len(_call_errors()[0])),
                         ids=[",".join(kw) for kw, _, _ in _call_errors()[0]])
def test_block_sparse_conv3d_errors(index):
    cases, (x, ws, b) = _call_errors()
    kwargs, error, names = cases[index]
    kwargs = {"input": x, "weight": ws, "bias": b, **kwargs}
    with raises_naming(error, names):
        lk3d.block_sparse_conv3d(**kwargs)


# ---------------------------------------------------------------------------------------------
# the custom ops: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------

PAD = [1, 0, 1, 1, 2, 0]  # (d_l, h_l, w_l, d_r, h_r, w_r): asymmetric both ways on purpose


@pytest.mark.parametrize("case", [CASES[6], CASES[10], CASES[13]], ids=["grouped", "depthwise",
                                                                       "no-block"])
def test_opcheck(case, device):
    x, ws, b = case.tensors(device=device)
    args = (list(ws.shape), list(ws.block_shape), [1, 2, 1], PAD, [1, 1, 2], case.groups)
    op = torch.ops.lk3d.block_sparse_conv3d.default
    torch.library.opcheck(op, (x, ws.values, ws.row_ptr, ws.col, b, *args))
    leaves = [t.detach().clone().requires_grad_() for t in (x, ws.values, b)]
    torch.library.opcheck(op, (*leaves[:2], ws.row_ptr, ws.col, leaves[2], *args))
    y = op(x, ws.values, ws.row_ptr, ws.col, b, *args)
    gy = torch.randn_like(y)
    backward = torch.ops.lk3d.block_sparse_conv3d_backward.default
    for mask in ([True, True], [False, True], [True, False]):
        torch.library.opcheck(backward, (gy, x, ws.values, ws.row_ptr, ws.col, *args, mask))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    case = CASES[3]
    x, ws, bias = case.tensors()

    def block(x, values, bias):
        w = lk3d.BlockSparseWeight(ws.shape, ws.block_shape, values, ws.row_ptr, ws.col)
        return F.gelu(lk3d.block_sparse_conv3d(torch.tanh(x), w, bias, **case.args()))

    names, leaves, _ = _leaves(x, ws, bias)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    y_eager, y_comp = block(*leaves), compiled(*leaves)
    assert_close_rel("output", y_comp, y_eager, TOL[torch.float64])
    gy = torch.randn_like(y_eager)
    for name, a, b in zip(names, torch.autograd.grad(y_comp, leaves, gy),
                          torch.autograd.grad(y_eager, leaves, gy)):
        assert_close_rel(f"grad {name}", a, b, TOL[torch.float64])


def test_compile_sees_one_node():
    x, ws, b = CASES[1].tensors()
    assert_one_node(lambda x, w: lk3d.block_sparse_conv3d(x, w, b, **CASES[1].args()), x, ws,
                    op="lk3d.block_sparse_conv3d")


# ---------------------------------------------------------------------------------------------
# fuzz
# ---------------------------------------------------------------------------------------------

@st.composite
def bs_cases(draw):
    geometry = draw_geometry(draw, max_kernel=4, slack=3)
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin_g = draw(st.sampled_from([1, 2, 3, 4]))
    cout_g = draw(st.sampled_from([1, 2, 3, 4]))
    cin, cout = groups * cin_g, groups * cout_g
    divisors = lambda n: [d for d in range(1, n + 1) if n % d == 0]  # noqa: E731
    bo = draw(st.sampled_from(divisors(cout_g if cin_g > 1 else cout)))
    block = (bo, draw(st.sampled_from(divisors(cin_g))),
             *(draw(st.sampled_from(divisors(k))) for k in geometry["kernel"]))
    return BS(N=draw(st.sampled_from([None, 1, 2])), cin=cin, cout=cout, block=block,
              density=draw(st.sampled_from([0, 0.2, 0.5, 0.8, 1.0])), groups=groups,
              **geometry, bias=draw(st.booleans()),
              layout=draw(st.sampled_from(["contiguous", "channels_last_3d"])))


def _fuzz(case, seed, strided):
    from conftest import DEVICE
    if case.N is None and case.layout != "contiguous":
        case = replace(case, layout="contiguous")
    x, ws, bias = case.tensors(seed=seed, device=DEVICE)
    if strided:  # non-contiguous index tensors and bias, as views of a user's own buffers give
        ws = replace(ws, row_ptr=strided_copy(ws.row_ptr), col=strided_copy(ws.col))
        bias = None if bias is None else strided_copy(bias)
    _check_against_dense(case, x, ws, bias)


@given(case=bs_cases(), seed=st.integers(0, 2 ** 16), strided=st.booleans())
def test_fuzz_matches_dense(case, seed, strided):
    _fuzz(case, seed, strided)


# Under the interpreter an example costs ~2 s (forward, grad-input and grad-values kernels).
@settings(max_examples=8)
@given(case=bs_cases(), seed=st.integers(0, 2 ** 16), strided=st.booleans())
def test_fuzz_kernels_match_dense(case, seed, strided):
    block_sparse.USE_KERNELS = True  # the autouse fixture restores it
    _fuzz(case, seed, strided)
