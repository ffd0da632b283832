"""Double backward of lk3d's convolutions: the backward ops' own autograd.

``lk3d.conv3d`` on each algorithm (``LK3D_ALGO=aten|fft|tiled``; ``tiled`` runs the Triton kernels,
in the interpreter on the CPU), ``lk3d.cp_conv3d`` (the factored torch sequence and the kernels)
and ``lk3d.block_sparse_conv3d`` (the sparse and dense torch routes and the kernels):
``gradgradcheck`` in float64 with a bias (non-cubic and even kernels, stride with a remainder,
dilation, asymmetric and ``"same"`` padding, groups, depthwise with multiplier, strided
tensors); second derivatives of partial first-order gradients against autograd through
``F.conv3d`` (with the dense weight for CP and block-sparse); third derivatives of
``lk3d.conv3d``; gradcheck of the CP and block-sparse backward ops with partial output masks; a
double backward traced whole by ``torch.compile(fullgraph=True)`` against eager; ``opcheck`` of
every backward op with inputs that require grad.

Interpreted kernels cost ~0.2 ms per Triton op per program, and a gradgradcheck some fifty to a
hundred convolutions: the kernel cases are tiny, with few taps, and leave the undefined-gradient
check (the same autograd code on every algorithm) to the torch paths.
"""
import pytest
import torch
import torch.nn.functional as F

import lk3d
from _cases import TOL, Case, rel_err
from conftest import DEVICE
from lk3d import block_sparse
from lk3d import cp as cp_ops
from lk3d._algos import kernels_take
from lk3d.autotune import registry

F64 = torch.float64
PAD = [1, 0, 1, 1, 2, 0]  # (d_l, h_l, w_l, d_r, h_r, w_r): asymmetric both ways on purpose
KERNELS_TAKE_F64 = kernels_take(DEVICE, F64)
needs_f64_kernels = pytest.mark.skipif(not KERNELS_TAKE_F64,
                                       reason=f"the Triton kernels do not take float64 on {DEVICE}")


@pytest.fixture(autouse=True)
def torch_paths(monkeypatch):
    """The torch paths unless a test asks for the kernels; the module switches restored after."""
    monkeypatch.setattr(cp_ops, "USE_KERNELS", False)
    monkeypatch.setattr(block_sparse, "USE_KERNELS", False)
    monkeypatch.setattr(block_sparse, "ROUTE", "sparse")


def _fail(*args, **kwargs):
    raise AssertionError("an implementation this test does not ask for ran")


def only_algo(monkeypatch, algo):
    """lk3d.conv3d's passes forced to ``algo`` (``LK3D_ALGO``), the others made to fail; None:
    every dense algorithm fails (a block-sparse path that must not use them)."""
    if algo is not None:
        monkeypatch.setenv("LK3D_ALGO", algo)
    for op in ("conv3d", "conv3d_grad_input", "conv3d_grad_weight"):
        for other in registry.algorithms(op):
            if other.name != algo:
                monkeypatch.setattr(other, "run", _fail)


def only_cp_kernels(monkeypatch):
    cp_ops.USE_KERNELS = True  # the autouse fixture restores it
    for op in ("cp_conv3d", "cp_conv3d_backward"):  # the torch sequence
        monkeypatch.setattr(registry.get(op, "aten"), "run", _fail)


def only_block_sparse_path(monkeypatch, path):
    """``path``: "kernels", or the torch path's route "sparse" or "dense"; the others fail."""
    if path == "kernels":
        block_sparse.USE_KERNELS = True  # the autouse fixture restores it
    else:
        block_sparse.ROUTE = path
    if path != "dense":
        only_algo(monkeypatch, None)
    if path != "sparse":
        monkeypatch.setattr(block_sparse, "block_sparse_conv3d_torch", _fail)
        monkeypatch.setattr(block_sparse, "block_sparse_conv3d_torch_backward", _fail)


def strided(t):
    """``t``'s values in a fresh leaf that is not contiguous (dims 0 and 1 swapped in memory, or
    every other element for a vector)."""
    if t is None:
        return None
    if t.dim() == 1:
        s = torch.empty(2 * t.shape[0], dtype=t.dtype, device=t.device)[::2].copy_(t)
    else:
        s = t.transpose(0, 1).contiguous().transpose(0, 1)
    return s.detach().requires_grad_()


def gradgradcheck(fn, leaves, undefined=True):
    return torch.autograd.gradgradcheck(fn, leaves, fast_mode=True,
                                        check_undefined_grad=undefined)


def second_order(fn, leaves, gy, requires, wrt):
    """Only the leaves at indices ``requires`` require grad (which sets the backward ops' output
    masks); a penalty ``sum |g|² · (1 + index)`` on the first-order gradients in those at ``wrt``
    (output gradient ``gy``), differentiated in the leaves at ``requires`` and in ``gy``."""
    leaves = [t.detach().requires_grad_(i in requires) for i, t in enumerate(leaves)]
    gy = gy.detach().requires_grad_()
    first = torch.autograd.grad(fn(*leaves), [leaves[i] for i in wrt], gy, create_graph=True)
    penalty = sum((g * g).sum() * (1 + i) for i, g in zip(wrt, first))
    return torch.autograd.grad(penalty, [leaves[i] for i in requires] + [gy], allow_unused=True,
                               materialize_grads=True)


# (leaves that require grad, those whose first-order gradients the penalty takes), for
# (input, weight, bias): one gradient alone; one asked for, others masked in; all.
MASKS = [((0,), (0,)), ((0, 1), (0,)), ((1, 2), (1, 2)), ((0, 1, 2), (0, 1, 2))]


def mask_id(mask):
    return "-".join("+".join(map(str, m)) for m in mask)


def assert_all_close(got, want, tol=TOL[F64], what="grad"):
    for i, (a, b) in enumerate(zip(got, want)):
        err = rel_err(a, b)
        assert err < tol, f"{what} {i}: relative error {err:.3g} >= {tol:g}"


# ---------------------------------------------------------------------------------------------
# lk3d.conv3d
# ---------------------------------------------------------------------------------------------

# Non-cubic kernels with even sides ("same" pads them asymmetrically); stride 2 where the padded
# extent leaves a remainder ((6 + 2 - 3) % 2 and (5 + 2 - 2) % 2: the transposed conv's
# output_padding); dilation 2 with asymmetric padding and groups; depthwise with multiplier 2.
CONV_CASES = [
    Case(2, 3, 4, (5, 6, 5), (3, 2, 3), padding="same"),
    Case(2, 3, 4, (7, 6, 5), (3, 3, 2), stride=2, padding=1),
    Case(2, 4, 6, (6, 5, 7), (2, 3, 3), padding=(1, 0, 2), dilation=2, groups=2),
    Case(2, 3, 6, (5, 5, 6), (3, 2, 3), padding="same", dilation=(1, 2, 1), groups=3),
]
# The same forms with fewer taps, for the interpreter: dense (the implicit GEMM kernels) and
# depthwise with multiplier (the depthwise kernels). A gradgradcheck costs some fifty kernel
# calls, a second-order comparison with F.conv3d some ten: the gradgradcheck takes the dense case.
TILED_CASES = [
    Case(2, 3, 4, (5, 6, 5), (3, 1, 2), stride=2, padding=(1, 0, 1)),
    Case(1, 2, 4, (5, 5, 6), (2, 3, 1), padding="same", dilation=2, groups=2),
]


def _conv_leaves(case, device):
    return [strided(t.to(device)) for t in case.tensors()]


def _algo_cases(cases, tiled_cases):
    return ([(a, c) for a in ("aten", "fft") for c in cases]
            + [pytest.param("tiled", c, marks=needs_f64_kernels) for c in tiled_cases])


def _algo_case_id(v):
    return v if isinstance(v, str) else v.id


@pytest.mark.parametrize("algo,case", _algo_cases(CONV_CASES, TILED_CASES[:1]), ids=_algo_case_id)
def test_conv3d_gradgradcheck(algo, case, device, monkeypatch):
    only_algo(monkeypatch, algo)
    leaves = _conv_leaves(case, device)
    assert gradgradcheck(lambda x, w, b: lk3d.conv3d(x, w, b, **case.args()), leaves,
                         undefined=algo != "tiled")


@pytest.mark.parametrize("algo,case", _algo_cases(CONV_CASES[1::2], TILED_CASES),
                         ids=_algo_case_id)
@pytest.mark.parametrize("mask", MASKS, ids=mask_id)
def test_conv3d_second_order_matches_torch(algo, case, mask, device, monkeypatch):
    """A penalty on some first-order gradients, channels_last_3d input: as F.conv3d's own double
    backward."""
    only_algo(monkeypatch, algo)
    x, w, b = case.tensors(device=device)
    leaves = [x.contiguous(memory_format=torch.channels_last_3d).requires_grad_(), strided(w),
              strided(b)]
    gy = torch.randn_like(F.conv3d(x, w, b, **case.args()))
    got = second_order(lambda *t: lk3d.conv3d(*t, **case.args()), leaves, gy, *mask)
    want = second_order(lambda *t: F.conv3d(*t, **case.args()), leaves, gy, *mask)
    assert_all_close(got, want)


def test_conv3d_third_order_matches_torch(device, monkeypatch):
    only_algo(monkeypatch, "aten")
    case = CONV_CASES[2]
    leaves = _conv_leaves(case, device)
    gy = torch.randn_like(F.conv3d(*leaves, **case.args())).requires_grad_()

    def third(conv):
        y = conv(*leaves, **case.args())
        gx, gw, gb = torch.autograd.grad(y, leaves, gy, create_graph=True)
        penalty = (gx * gx).sum() + (gw * gw).sum() + (gb * gb).sum()
        hx, hw, hgy = torch.autograd.grad(penalty, (leaves[0], leaves[1], gy), create_graph=True)
        return torch.autograd.grad((hx * hx).sum() + (hw * hw).sum() + (hgy * hgy).sum(),
                                   (leaves[0], leaves[1], gy))

    assert_all_close(third(lk3d.conv3d), third(F.conv3d))


# ---------------------------------------------------------------------------------------------
# lk3d.cp_conv3d
# ---------------------------------------------------------------------------------------------

def _cp_leaves(N, cin, cout, size, kernel, rank, weights, device, seed=0):
    """``[x, U_out, U_in, A, B, C, (weights,) bias]`` as strided leaves."""
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(N, cin, *size, generator=g, dtype=F64)]
    ts += [torch.randn(n, rank, generator=g, dtype=F64) for n in (cout, cin, *kernel)]
    if weights:
        ts.append(torch.rand(rank, generator=g, dtype=F64) + 0.5)
    ts.append(torch.randn(cout, generator=g, dtype=F64))
    return [strided(t.to(device)) for t in ts]


def _cp_fn(weights, args, conv=None):
    def fn(x, *t):
        factors = lk3d.CPFactors(*t[:5], t[5] if weights else None)
        if conv is not None:
            return conv(x, factors.to_dense(), t[-1], **args)
        return lk3d.cp_conv3d(x, factors, t[-1], **args)
    return fn


CP_CASES = [  # (N, cin, cout, size, kernel, rank, weights, args)
    (2, 3, 4, (5, 4, 5), (3, 2, 3), 2, True, dict(padding="same", dilation=(1, 2, 1))),
    (1, 2, 3, (5, 6, 4), (2, 3, 2), 3, False, dict(stride=(2, 1, 2), padding=(1, 0, 1))),
]


@pytest.mark.parametrize("path,case", [("torch", c) for c in CP_CASES]
                         + [pytest.param("kernels", CP_CASES[1], marks=needs_f64_kernels)],
                         ids=["torch-weights", "torch-noweights", "kernels-noweights"])
def test_cp_gradgradcheck(path, case, device, monkeypatch):
    if path == "kernels":
        only_cp_kernels(monkeypatch)
    *shape, weights, args = case
    leaves = _cp_leaves(*shape, weights, device)
    assert gradgradcheck(_cp_fn(weights, args), leaves, undefined=path == "torch")


# Leaves: input, U_out, U_in, A, B, C, weights, bias.
@pytest.mark.parametrize("mask", [((0,), (0,)), ((0, 2, 3), (0,)), ((1, 6), (1, 6)),
                                  (tuple(range(8)), (1, 3, 6)), (tuple(range(8)),) * 2],
                         ids=mask_id)
@pytest.mark.parametrize("path", ["torch", pytest.param("kernels", marks=needs_f64_kernels)])
def test_cp_second_order_matches_dense(mask, path, device, monkeypatch):
    """Penalties on some first-order gradients, some leaves not requiring grad (the backward op's
    output mask): as F.conv3d with the dense weight."""
    if path == "kernels":
        only_cp_kernels(monkeypatch)
    *shape, _, args = CP_CASES[0]
    shape[5] = 6  # rank 6: dW's five blocks take three calls (rank 12, 12, 6 within R_PAD 16)
    leaves = _cp_leaves(*shape, True, device, seed=1)
    gy = torch.randn_like(_cp_fn(True, args, F.conv3d)(*leaves))
    got = second_order(_cp_fn(True, args), leaves, gy, *mask)
    want = second_order(_cp_fn(True, args, F.conv3d), leaves, gy, *mask)
    assert_all_close(got, want, 1e-10)


def test_cp_backward_op_gradcheck_partial_mask(device):
    """The backward op called directly: entries its output mask leaves out are constant zeros,
    whatever cotangent they get."""
    x, *factors, _ = _cp_leaves(1, 2, 3, (4, 5, 4), (2, 3, 2), 2, True, device)
    args = ([1, 2, 1], PAD, [1, 1, 2])
    gy = strided(torch.randn_like(torch.ops.lk3d.cp_conv3d(x, *factors, None, *args)))
    mask = [False, True, False, True, False, True, False]
    assert torch.autograd.gradcheck(
        lambda *t: torch.ops.lk3d.cp_conv3d_backward(*t, *args, mask), (gy, x, *factors),
        fast_mode=True)


# ---------------------------------------------------------------------------------------------
# lk3d.block_sparse_conv3d
# ---------------------------------------------------------------------------------------------

BS_CASES = [  # (N, cin, cout, size, kernel, block_shape, groups, args)
    (2, 4, 4, (5, 4, 5), (3, 2, 3), (2, 2, 1, 2, 1), 1, dict(padding="same", dilation=(1, 1, 2))),
    (2, 4, 4, (6, 5, 6), (3, 2, 3), (2, 1, 1, 1, 3), 2, dict(stride=(2, 1, 2), padding=(1, 0, 1))),
    (1, 3, 6, (5, 4, 5), (3, 3, 1), (3, 1, 1, 1, 1), 3, dict(padding="valid")),
]
BS_KERNEL_CASE = (1, 2, 4, (5, 4, 5), (3, 1, 2), (2, 1, 1, 1, 2), 2, dict(stride=2, padding=1))


def _bs(case, device, seed=0):
    """``(leaves [x, values, bias], the weight, fn of the leaves, the same through F.conv3d and
    the dense weight)`` for a block-sparse case at density 1/2."""
    N, cin, cout, size, kernel, block, groups, args = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, cin, *size, generator=g, dtype=F64)
    w = torch.randn(cout, cin // groups, *kernel, generator=g, dtype=F64)
    ws = lk3d.BlockSparseWeight.from_dense(w, block, density=0.5).to(device)
    b = torch.randn(cout, generator=g, dtype=F64)
    leaves = [strided(t.to(device)) for t in (x, ws.values, b)]

    def fn(x, v, b):
        return lk3d.block_sparse_conv3d(x, ws.with_values(v), b, groups=groups, **args)

    def dense(x, v, b):
        return F.conv3d(x, ws.with_values(v).to_dense(), b, groups=groups, **args)
    return leaves, ws, fn, dense


@pytest.mark.parametrize("path,case", [(r, c) for r in ("sparse", "dense") for c in BS_CASES]
                         + [pytest.param("kernels", BS_KERNEL_CASE, marks=needs_f64_kernels)],
                         ids=[f"{r}-{i}" for r in ("sparse", "dense") for i in range(3)]
                         + ["kernels"])
def test_block_sparse_gradgradcheck(path, case, device, monkeypatch):
    only_block_sparse_path(monkeypatch, path)
    leaves, _, fn, _ = _bs(case, device)
    assert gradgradcheck(fn, leaves, undefined=path != "kernels")


@pytest.mark.parametrize("mask", MASKS, ids=mask_id)
def test_block_sparse_second_order_matches_dense(mask, device, monkeypatch):
    only_block_sparse_path(monkeypatch, "sparse")
    leaves, _, fn, dense = _bs(BS_CASES[1], device, seed=1)
    gy = torch.randn_like(dense(*leaves))
    assert_all_close(second_order(fn, leaves, gy, *mask), second_order(dense, leaves, gy, *mask),
                     1e-10)


@pytest.mark.parametrize("mask", [[True, False], [False, True]], ids=["input", "values"])
def test_block_sparse_backward_op_gradcheck_partial_mask(mask, device):
    """The backward op called directly: the entry its output mask leaves out is constant zeros,
    whatever cotangent it gets."""
    (x, values, _), ws, _, _ = _bs(BS_CASES[1], device)
    args = (list(ws.shape), list(ws.block_shape), [1, 2, 1], PAD, [1, 1, 2], BS_CASES[1][6])
    gy = strided(torch.randn_like(torch.ops.lk3d.block_sparse_conv3d(x, values, ws.row_ptr,
                                                                     ws.col, None, *args)))
    assert torch.autograd.gradcheck(
        lambda gy, x, v: torch.ops.lk3d.block_sparse_conv3d_backward(gy, x, v, ws.row_ptr,
                                                                     ws.col, *args, mask),
        (gy, x, values), fast_mode=True)


# ---------------------------------------------------------------------------------------------
# torch.compile and opcheck
# ---------------------------------------------------------------------------------------------

def _penalised(fn, n_grads):
    """``leaves -> a loss on fn's output plus a penalty on its gradients in the first n_grads
    leaves``: the first-order gradients are taken inside, so a compiled version traces the double
    backward whole."""
    def step(*leaves):
        y = fn(*leaves)
        grads = torch.autograd.grad((y * y).sum(), leaves[:n_grads], create_graph=True)
        return sum((g * g).sum() for g in grads) + y.sum()
    return step


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"),
                    reason="torch.compile traces torch.autograd.grad from torch 2.11 on")
@pytest.mark.parametrize("op", ["conv3d", "cp_conv3d", "block_sparse_conv3d"])
def test_compile_double_backward_matches_eager(op, device, monkeypatch):
    monkeypatch.setenv("LK3D_ALGO", "aten")
    torch._dynamo.reset()
    if op == "conv3d":
        case = CONV_CASES[2]
        leaves = _conv_leaves(case, device)
        fn = lambda x, w, b: lk3d.conv3d(x, w, b, **case.args())  # noqa: E731
    elif op == "cp_conv3d":
        *shape, weights, args = CP_CASES[0]
        leaves, fn = _cp_leaves(*shape, weights, device), _cp_fn(weights, args)
    else:
        leaves, _, fn, _ = _bs(BS_CASES[0], device)
    step = _penalised(fn, 2)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
        got_loss = compiled(*leaves)
    want_loss = step(*leaves)
    assert rel_err(got_loss, want_loss) < TOL[F64]
    assert_all_close(torch.autograd.grad(got_loss, leaves), torch.autograd.grad(want_loss, leaves))


def _grad_leaf(t):
    return t.detach().clone().requires_grad_()


@pytest.mark.parametrize("groups", [1, 2], ids=["dense", "depthwise"])
def test_opcheck_conv3d_backward_ops(groups, device, monkeypatch):
    monkeypatch.setenv("LK3D_ALGO", "aten")
    x, w, _ = Case(2, 2, 4, (5, 4, 6), (3, 2, 3), groups=groups).tensors(device=device)
    args = ([1, 2, 1], PAD, [1, 1, 2], groups)
    gy = torch.randn_like(torch.ops.lk3d.conv3d(x, w, None, *args))
    ops = torch.ops.lk3d
    torch.library.opcheck(ops.conv3d_grad_input.default,
                          (_grad_leaf(gy), _grad_leaf(w), list(x.shape), *args))
    torch.library.opcheck(ops.conv3d_grad_weight.default,
                          (_grad_leaf(gy), _grad_leaf(x), list(w.shape), *args))
    torch.library.opcheck(ops.conv3d_grad_bias.default, (_grad_leaf(gy),))


@pytest.mark.parametrize("weights,mask", [(True, [True] * 7),
                                          (False, [True, False, True, False, False, True, False])],
                         ids=["weights-all", "noweights-some"])
def test_opcheck_cp_backward_op(weights, mask, device):
    x, *factors, _ = _cp_leaves(2, 3, 4, (5, 4, 6), (3, 2, 3), 2, weights, device)
    if not weights:
        factors.append(None)
    args = ([1, 2, 1], PAD, [1, 1, 2])
    gy = torch.randn_like(torch.ops.lk3d.cp_conv3d(x, *factors, None, *args))
    torch.library.opcheck(torch.ops.lk3d.cp_conv3d_backward.default,
                          (_grad_leaf(gy), _grad_leaf(x),
                           *(None if f is None else _grad_leaf(f) for f in factors), *args, mask))


def test_opcheck_block_sparse_backward_op(device):
    (x, _, _), ws, _, _ = _bs(BS_CASES[1], device)
    args = (list(ws.shape), list(ws.block_shape), [1, 2, 1], PAD, [1, 1, 2], BS_CASES[1][6])
    gy = torch.randn_like(torch.ops.lk3d.block_sparse_conv3d(x, ws.values, ws.row_ptr, ws.col,
                                                             None, *args))
    for mask in ([True, True], [False, True], [True, False]):
        torch.library.opcheck(torch.ops.lk3d.block_sparse_conv3d_backward.default,
                              (_grad_leaf(gy), _grad_leaf(x), _grad_leaf(ws.values), ws.row_ptr,
                               ws.col, *args, mask))
