"""The separable CP kernels (``lk3d.kernels.cp.cp_sep_kernel``, algorithm "separable" of
``lk3d.cp_conv3d``) under the interpreter on the CPU, in float64: forward and every gradient
against ``F.conv3d`` with the reconstructed dense weight (ranks 1, 3, 5 and 17; non-cubic kernels,
stride, dilation, every padding form, channels_last_3d and strided inputs, strided factors),
several tiles per program in the partial sums, partial output masks, gradcheck, and that the
forward allocates only its output and the documented R-channel intermediates. Every buffer the
launchers allocate starts as NaN (``common.POISON``). The planner's choice on a GPU is checked
from the CUDA cost model."""
import math

import pytest
import torch
import torch.nn.functional as F

import lk3d
from _cases import TOL, Case, rel_err
from conftest import DEVICE
from lk3d import cp as cp_ops
from lk3d._algos import kernels_take
from lk3d.autotune import registry

pytestmark = pytest.mark.skipif(not kernels_take(DEVICE, torch.float64),
                                reason=f"the Triton kernels do not take float64 on {DEVICE}")

if lk3d.kernels.HAS_TRITON:
    from lk3d.kernels import common
    from lk3d.kernels import cp as cp_kernels

NAMES = ("input", "U_out", "U_in", "A", "B", "C", "weights", "bias")
CP = Case.cp


@pytest.fixture(autouse=True)
def separable(monkeypatch):
    """NaN-filled buffers; the separable kernels forced; the other algorithms made to fail."""
    monkeypatch.setattr(common, "POISON", True)
    monkeypatch.setenv("LK3D_ALGO", "separable")

    def fail(*args, **kwargs):
        raise AssertionError("another algorithm ran")
    for op in ("cp_conv3d", "cp_conv3d_backward"):
        for name in ("tiled", "aten"):
            monkeypatch.setattr(registry.get(op, name), "run", fail)


def tensors(case, device, dtype=torch.float64, seed=0):
    x, factors, b = case.tensors(dtype, device, seed)
    return [x, *factors.tensors(), b]


def _check(case, device, ts=None, tol=1e-12):
    ts = ts or tensors(case, device)
    want_ts = [None if t is None else t.detach().double().cpu().requires_grad_() for t in ts]
    got_ts = [None if t is None else t.detach().clone().requires_grad_() for t in ts]
    x, *f, b = want_ts
    want = F.conv3d(x, lk3d.CPFactors(*f).to_dense(), b, **case.args())
    x, *f, b = got_ts
    given = [None if t is None else t.detach().clone() for t in ts]
    got = lk3d.cp_conv3d(x, lk3d.CPFactors(*f), b, **case.args())
    assert got.shape == want.shape and (err := rel_err(got, want)) < tol, f"output: {err:.3g}"
    if case.layout == "channels_last_3d":
        assert got.is_contiguous(memory_format=torch.channels_last_3d)
    gy = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    live = [i for i, t in enumerate(ts) if t is not None]
    want_g = torch.autograd.grad(want, [want_ts[i] for i in live], gy)
    got_g = torch.autograd.grad(got, [got_ts[i] for i in live], gy.to(device))
    for i, g, w in zip(live, got_g, want_g):
        assert g.shape == w.shape and (err := rel_err(g, w)) < tol, f"{NAMES[i]}: {err:.3g}"
    for i in live:  # nothing the caller passed changed
        assert torch.equal(ts[i], given[i]), NAMES[i]


CASES = [
    CP(2, 3, 4, (7, 6, 5), (3, 2, 3), 3, padding=(1, 0, 2)),
    CP(1, 4, 3, (9, 7, 8), (3, 3, 2), 1, stride=2, padding=1),
    CP(1, 3, 5, (6, 7, 5), (4, 2, 3), 17, padding="same", dilation=(1, 2, 1)),
    CP(2, 2, 3, (9, 6, 7), (3, 1, 3), 5, padding=2, dilation=2, weights=False),
    CP(1, 5, 2, (7, 5, 6), (2, 3, 3), 3, stride=(2, 1, 2), padding="valid", bias=False),
    CP(2, 3, 2, (5, 6, 7), (3, 3, 1), 3, padding=(1, 1, 0), layout="channels_last_3d"),
    CP(1, 2, 3, (5, 7, 6), (3, 2, 2), 1, stride=(1, 2, 1), padding=1, layout="permuted"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_dense(case, device):
    _check(case, device)


def test_strided_factors_and_bias(device):
    """Factors, weights and bias as strided views (every other column / element)."""
    case = CP(1, 3, 4, (5, 6, 7), (3, 2, 2), 3, stride=(1, 2, 1), padding=(1, 1, 0))
    ts = tensors(case, device)
    ts = [ts[0]] + [None if t is None else
                    torch.stack([t, torch.randn_like(t)], -1).select(-1, 0) for t in ts[1:]]
    assert not ts[1].is_contiguous() and not ts[-1].is_contiguous()
    _check(case, device, ts)


def test_float32(device, no_tf32):
    case = CASES[2]
    ts = tensors(case, device, torch.float32)
    x, *f, b = ts
    want = F.conv3d(x.double(), lk3d.CPFactors(*(t.double() for t in f)).to_dense(), b.double(),
                    **case.args())
    got = lk3d.cp_conv3d(x, lk3d.CPFactors(*f), b, **case.args())
    assert got.dtype == torch.float32 and rel_err(got, want) < TOL[torch.float32]


def test_tiles_per_program(device):
    """32-voxel tiles, at most 2 programs: each sums several tiles into its partials, and the
    launcher sums the programs' partials."""
    case = CP(2, 17, 18, (3, 4, 5), (2, 3, 2), 5, stride=(1, 1, 2), padding=(1, 0, 0))
    x, Uo, Ui, A, B, C, w, b = tensors(case, device)
    spec = cp_ops.check_cp_conv3d(x, lk3d.CPFactors(Uo, Ui, A, B, C, w), b, case.stride,
                                  case.padding, case.dilation, 1)
    geo = (spec.stride, spec.padding, spec.dilation)
    config = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, SPLIT=2)
    ref = [t.detach().clone().requires_grad_() for t in (x, Uo, Ui, A, B, C, w)]
    want = F.conv3d(ref[0], lk3d.CPFactors(*ref[1:]).to_dense(), b, **case.args())
    y = cp_kernels.cp_sep_fwd(x, Uo, Ui, A, B, C, w, b, *geo, config)
    assert rel_err(y, want) < 1e-12
    gy = torch.randn(want.shape, dtype=torch.float64)
    gx, gUo, gUi, gA, gB, gC, gw = torch.autograd.grad(want, ref, gy)
    dx, dUi, tA, tB, tC, G = cp_kernels.cp_sep_bwd(gy.to(device), x, Uo, Ui, A, B, C, w, *geo,
                                                   config, [True] * 7)
    for name, got, ref_g in (("input", dx, gx), ("U_in", dUi, gUi), ("A", tA, gA), ("B", tB, gB),
                             ("C", tC, gC), ("U_out", G * w, gUo),
                             ("weights", (G * Uo).sum(0), gw)):
        assert (err := rel_err(got, ref_g)) < 1e-12, f"{name}: {err:.3g}"


@pytest.mark.parametrize("weights", [True, False], ids=["weights", "noweights"])
def test_gradcheck(weights, device):
    case = CP(1, 3, 2, (5, 4, 5), (3, 2, 3), 2, padding=1, stride=(1, 2, 1), weights=weights)
    ts = [None if t is None else t.requires_grad_() for t in tensors(case, device)]
    live = [t for t in ts if t is not None]

    def fn(*leaves):
        it = iter(leaves)
        x, *f, b = [None if t is None else next(it) for t in ts]
        return lk3d.cp_conv3d(x, lk3d.CPFactors(*f), b, **case.args())
    assert torch.autograd.gradcheck(fn, live, fast_mode=True)


MASKS = [
    [True, False, False, False, False, False, False],
    [False, False, True, False, False, False, False],
    [False, True, False, False, False, False, True],
    [False, False, False, True, False, False, False],
    [False, False, False, False, True, False, False],
    [False, False, False, False, False, True, False],
]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "+".join(
    n for n, on in zip(NAMES, m) if on))
def test_backward_op_masks(mask, device, monkeypatch):
    """The backward op computes what its mask asks for (matching the torch sequence), zeros for
    the rest, and launches only the passes those need."""
    case = CP(1, 3, 4, (5, 6, 4), (3, 2, 3), 3, stride=(1, 2, 1), padding=(1, 0, 1))
    x, *f, _ = tensors(case, device)
    args = ([1, 2, 1], [1, 0, 1, 1, 0, 1], [1, 1, 1])
    gy = torch.randn(1, 4, 5, 3, 4, dtype=torch.float64, device=device)
    want = cp_ops.cp_conv3d_torch_backward(gy, x, *f, *args, [True] * 7)
    launched = []
    real = cp_kernels._sep_pass
    monkeypatch.setattr(cp_kernels, "_sep_pass",
                        lambda *a, **k: launched.append(k.get("axis")) or real(*a, **k))
    got = torch.ops.lk3d.cp_conv3d_backward(gy, x, *f, *args, mask)
    for name, on, g, w in zip(NAMES, mask, got, want):
        if on:
            assert (err := rel_err(g, w)) < 1e-12, f"grad {name}: {err:.3g}"
        else:
            assert g.shape == w.shape and not g.any(), name
    # launches: recomputed forward passes up to the factor asked for, G for U_out / weights,
    # the output-gradient projection and the transposed passes down to the factor asked for.
    expect = {0: 4, 1: 4, 2: 4, 3: 5, 4: 5, 5: 5}[mask.index(True)]
    assert len(launched) == expect, launched


@pytest.mark.skipif(DEVICE != "cpu", reason="counts CPU allocations")
def test_forward_allocates_output_and_intermediates():
    """The forward allocates its output and the three R-channel intermediates (the grids after
    the U_in projection, the W pass and the H pass), nothing larger."""
    from torch.profiler import ProfilerActivity, profile
    case = CP(1, 3, 2, (6, 7, 5), (3, 3, 3), 17, padding="same")
    x, *f, b = tensors(case, "cpu")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = lk3d.cp_conv3d(x, lk3d.CPFactors(*f), b, padding="same")
    sizes = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
    z_bytes = case.rank * x[0, 0].numel() * x.element_size()
    out_bytes = y.numel() * y.element_size()
    big = sorted(s for s in sizes if s > x.element_size())
    assert big == sorted([out_bytes] + [z_bytes] * 3)


def test_planner_picks_separable_on_cuda(monkeypatch):
    """On an H100's figures the model prices the separable kernels below the torch chain and the
    k³ fused kernels at the G4 goal shape (rank 16, k = 21, 64 -> 64, bf16), forward and
    backward; at k = 1 the fused kernel (no taps to separate) stays the cheaper kernel."""
    from lk3d.autotune import devices
    monkeypatch.setattr(devices, "of", lambda device: devices.named("h100"))
    cuda = torch.device("cuda")

    def ms(algo, k, backward=False):
        return cp_ops.model_ms(algo, [2, 64, 64, 64, 64], 64, 16, (k,) * 3, [1, 1, 1],
                               [k // 2] * 6, [1, 1, 1], torch.bfloat16, cuda, backward)
    for backward in (False, True):
        assert ms("separable", 21, backward) < ms("aten", 21, backward) < ms("tiled", 21, backward)
    assert ms("tiled", 1) < ms("separable", 1)
    launches = cp_ops.separable_launches([2, 64, 64, 64, 64], 64, 16, [21] * 3, [1] * 3,
                                         [10] * 6, [1] * 3)
    voxels = 2 * 64 ** 3
    assert sum(t + f for t, f, _ in launches) == 2 * 16 * (64 + 63 + 64) * voxels
    assert sum(m for *_, m in launches) == voxels * (64 + 64 + 2 * 3 * 16)
    assert math.isinf(cp_ops.model_ms("separable", [1, 2, 3, 3, 3], 2, 1, (1, 1, 1), [1] * 3,
                                      [0] * 6, [1] * 3, torch.float32, torch.device("cpu")))
