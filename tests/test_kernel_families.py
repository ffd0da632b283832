"""Each family of Triton kernels once, forward and backward, through the public ops with the
kernels forced: dense (implicit GEMM, its grad-input and grad-weight, the bias gradient; the
forward, grad-input and grad-weight on tensor descriptors too), depthwise (and its
grad-weight), rank-R CP (forward, grad-input, factor gradients), block-sparse (forward,
grad-input, grad-values), and ``lk3d.conv3d`` under ``torch.compile(fullgraph=True)``.
fp32 (TF32 off) against float64 ``F.conv3d`` of the same weight.

These are the CUDA test subset of perf_reports/gpu_run.sh (marker ``gpu_run``, with
tests/test_conv3d.py's test that the planner picks the kernels on the test device): on a GPU a
first call compiles each kernel specialisation, so the subset keeps few of them. The count is
checked under the interpreter (tests/test_gpu_run.py); a test added here must keep it under
that budget.
"""
import pytest
import torch
import torch.nn.functional as F

import lk3d
from _cases import TOL, Case, conv3d_ref, leaf_like, rel_err
from lk3d import block_sparse

pytestmark = [pytest.mark.gpu_run, pytest.mark.usefixtures("no_tf32")]

# Reductions over taps and channels round more than the output does: the gradients get 10x the
# output's tolerance, as in test_conv3d.py.
GRAD_TOL = 10 * TOL[torch.float32]

CONV_CASES = [
    Case(2, 3, 5, (7, 6, 5), (3, 2, 3), stride=(1, 2, 1), padding=(1, 0, 1)),
    Case(1, 4, 4, (9, 7, 5), (7, 3, 5), padding="same", groups=4),
    Case(2, 8, 8, (5, 4, 7), (3, 2, 5), padding="same", groups=8),  # channels innermost
    # 16 channels: forward, grad-input and grad-weight on tensor descriptors (TMA from sm_90)
    Case(1, 16, 16, (5, 6, 9), (3, 3, 3), padding="same"),
    # ... at stride 2 along D: grad-input by stride phases, written into strided views (its two
    # phases of one tap each share one specialisation)
    Case(1, 16, 16, (6, 5, 7), (2, 3, 3), stride=(2, 1, 1), padding=(0, 1, 1), bias=False),
]


@pytest.fixture(autouse=True)
def kernels(monkeypatch):
    """The Triton kernels for every pass (the planner could take aten or FFT on a GPU)."""
    monkeypatch.setenv("LK3D_ALGO", "tiled")
    monkeypatch.setattr(block_sparse, "ROUTE", "sparse")


def _check(fn, leaves, reference, names):
    """``fn(*leaves)`` and its gradients against ``reference`` (float64, on the CPU) of float64
    copies of the leaves."""
    ref_leaves = [t.detach().to("cpu", torch.float64).requires_grad_() for t in leaves]
    got, want = fn(*leaves), reference(*ref_leaves)
    assert got.dtype == leaves[0].dtype and got.device == leaves[0].device
    assert (err := rel_err(got, want)) < TOL[torch.float32], f"output: {err:.3g}"
    gy = torch.randn(want.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got_g = torch.autograd.grad(got, leaves, gy.to(got))
    want_g = torch.autograd.grad(want, ref_leaves, gy)
    for name, g, w in zip(names, got_g, want_g):
        assert g.shape == w.shape, name
        assert (err := rel_err(g, w)) < GRAD_TOL, f"grad {name}: {err:.3g}"


@pytest.mark.parametrize("case", CONV_CASES, ids=["dense", "depthwise", "depthwise-cl",
                                                "descriptor", "descriptor-strided"])
def test_conv3d(case, device):
    x, w, b = case.tensors(torch.float32, device)
    leaves = [leaf_like(t) for t in (x, w, b) if t is not None]
    assert {p["algo"] for p in lk3d.explain(x, w, b, **case.args()).values()} == {"tiled"}
    _check(lambda *t: lk3d.conv3d(*t, **case.args()), leaves,
           lambda *t: F.conv3d(*t, **case.args()), ("input", "weight", "bias"))


@pytest.mark.parametrize("algo", ["separable", "tiled"])
def test_cp_conv3d(algo, device, monkeypatch):
    """The separable kernels and the fused k³ ones."""
    monkeypatch.setenv("LK3D_ALGO", algo)
    case = Case.cp(2, 3, 4, (7, 6, 5), (3, 2, 3), 5, padding=(1, 0, 1))
    x, factors, b = case.tensors(torch.float32, device)
    leaves = [leaf_like(t) for t in (x, *factors.tensors(), b)]
    assert {p["algo"] for p in lk3d.cp.explain(x, factors, b, **case.args()).values()} == \
        {algo}

    def cp(x, *rest, conv):
        *f, b = rest
        return conv(x, lk3d.CPFactors(*f), b)

    _check(lambda *t: cp(*t, conv=lambda x, f, b: lk3d.cp_conv3d(x, f, b, **case.args())),
           leaves, lambda *t: cp(*t, conv=lambda x, f, b: F.conv3d(x, f.to_dense(), b,
                                                                   **case.args())),
           ("input", "U_out", "U_in", "A", "B", "C", "weights", "bias"))


def test_block_sparse_conv3d(device):
    case = Case.block_sparse(1, 4, 6, (5, 7, 6), (3, 3, 3), (2, 2, 1, 1, 1), 0.5, padding=1)
    x, ws, b = case.tensors(torch.float32, device)
    assert block_sparse.explain(x, ws, b, **case.args()) == {"path": "kernels"}

    def weight(values):
        on = values.device
        return lk3d.BlockSparseWeight(ws.shape, ws.block_shape, values, ws.row_ptr.to(on),
                                      ws.col.to(on))

    _check(lambda x, v, b: lk3d.block_sparse_conv3d(x, weight(v), b, **case.args()),
           [leaf_like(t) for t in (x, ws.values, b)],
           lambda x, v, b: F.conv3d(x, weight(v).to_dense(), b, **case.args()),
           ("input", "values", "bias"))


def test_compile_fullgraph(device):
    """torch.compile (aot_eager: lk3d's kernels, no code generated by inductor) of the dense case:
    the same kernel specialisations as test_conv3d's, the same result as eager."""
    torch._dynamo.reset()
    case = CONV_CASES[0]
    x, w, b = (leaf_like(t) for t in case.tensors(torch.float32, device))

    def layer(x, w, b):
        return torch.tanh(lk3d.conv3d(x, w, b, **case.args()))

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y_eager, y_comp = layer(x, w, b), compiled(x, w, b)
    assert rel_err(y_comp, y_eager) < TOL[torch.float32]
    assert rel_err(y_comp, torch.tanh(conv3d_ref(x, w, b, **case.args()))) < TOL[torch.float32]
    gy = torch.randn_like(y_eager)
    for name, got, want in zip(("input", "weight", "bias"),
                               torch.autograd.grad(y_comp, (x, w, b), gy),
                               torch.autograd.grad(y_eager, (x, w, b), gy)):
        assert (err := rel_err(got, want)) < TOL[torch.float32], f"grad {name}: {err:.3g}"
