"""The fused CP Triton kernels (``lk3d.kernels.cp``) behind ``lk3d.cp_conv3d``, under the
interpreter on the CPU, in float64: forward, grad-input and the factor gradients against
``F.conv3d`` with the reconstructed dense weight (ranks 1, 3 and 17, i.e. R_PAD 16 and 32;
non-cubic kernels, stride, dilation, every padding form, channels_last_3d and strided inputs),
fp32/fp16, both step shapes (SPAN) and multi-tile programs, every shipped config once, gradcheck,
partial output masks, that the kernels really run, and that the forward allocates nothing but its
output. Every buffer the launchers allocate starts as NaN (``common.POISON``).
"""
import pytest
import torch
import torch.nn.functional as F

import lk3d
from _cases import TOL, Case, rel_err
from conftest import DEVICE
from lk3d import cp as cp_ops
from lk3d._algos import kernels_take
from lk3d.autotune import registry
from lk3d.kernels.cp_configs import CONFIG_SPACES

# The checks are float64 against a float64 reference: they run where the kernels take float64,
# i.e. under the Triton interpreter on the CPU.
pytestmark = pytest.mark.skipif(not kernels_take(DEVICE, torch.float64),
                                reason=f"the Triton kernels do not take float64 on {DEVICE}")

if lk3d.kernels.HAS_TRITON:
    from lk3d.kernels import cp as cp_kernels
    from lk3d.kernels import common

NAMES = ("input", "U_out", "U_in", "A", "B", "C", "weights", "bias")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(common, "POISON", True)


CP = Case.cp


def tensors(case, device, dtype=torch.float64, seed=0):
    """``[x, U_out, U_in, A, B, C, weights or None, bias or None]`` of a CP ``case``."""
    x, factors, b = case.tensors(dtype, device, seed)
    return [x, *factors.tensors(), b]


def _dense(ts, args):
    """The reference: F.conv3d with the dense weight, differentiable in every tensor."""
    x, *f, b = ts
    return F.conv3d(x, lk3d.CPFactors(*f).to_dense(), b, **args)


def _cp(ts, args):
    x, *f, b = ts
    return lk3d.cp_conv3d(x, lk3d.CPFactors(*f), b, **args)


def _check_against_dense(case, device, dtype=torch.float64, tol=None, grad_tol=1e-10):
    ts = tensors(case, device, dtype)
    want_ts = [None if t is None else t.detach().double().cpu().requires_grad_() for t in ts]
    got_ts = [None if t is None else t.detach().clone().requires_grad_() for t in ts]
    want = _dense(want_ts, case.args())
    got = _cp(got_ts, case.args())
    tol = tol or TOL[dtype]
    assert got.dtype == dtype and got.shape == want.shape
    assert (err := rel_err(got, want)) < tol, f"output: relative error {err:.3g}"
    if case.layout == "channels_last_3d":
        assert got.is_contiguous(memory_format=torch.channels_last_3d)
    gy = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    live = [i for i, t in enumerate(ts) if t is not None]
    want_g = torch.autograd.grad(want, [want_ts[i] for i in live], gy)
    got_g = torch.autograd.grad(got, [got_ts[i] for i in live], gy.to(device, dtype))
    for i, g, w in zip(live, got_g, want_g):
        assert g.shape == w.shape, NAMES[i]
        assert (err := rel_err(g, w)) < grad_tol, f"grad {NAMES[i]}: relative error {err:.3g}"


CASES = [
    CP(2, 3, 4, (7, 6, 5), (3, 2, 3), 3, padding=(1, 0, 2)),
    CP(1, 4, 3, (9, 7, 8), (3, 3, 2), 1, stride=2, padding=1),
    CP(1, 3, 5, (6, 7, 5), (4, 2, 3), 17, padding="same", dilation=(1, 2, 1)),
    CP(2, 2, 3, (9, 6, 7), (3, 1, 3), 3, padding=2, dilation=2, weights=False),
    CP(1, 5, 2, (7, 5, 6), (2, 3, 3), 17, stride=(2, 1, 2), padding="valid", bias=False),
    CP(2, 3, 2, (5, 6, 7), (3, 3, 1), 3, padding=(1, 1, 0), layout="channels_last_3d"),
    CP(1, 2, 3, (5, 7, 6), (3, 2, 2), 1, stride=(1, 2, 1), padding=1, layout="permuted"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_dense(case, device):
    _check_against_dense(case, device)


@pytest.mark.parametrize("dtype, tol, grad_tol", [(torch.float32, TOL[torch.float32], 1e-4),
                                                  (torch.float16, 4 * TOL[torch.float16], 3e-2)],
                         ids=["float32", "float16"])
def test_low_precision(dtype, tol, grad_tol, device, no_tf32):
    """The fp32 accumulator keeps fp32 at its usual error; fp16 operands round the folded
    projection block and z (fed to the second tl.dot) once each, as the torch sequence rounds its
    intermediates."""
    _check_against_dense(CASES[2], device, dtype, tol, grad_tol)


# ---------------------------------------------------------------------------------------------
# the launchers with explicit configs: both step shapes, several tiles per program, every
# shipped config
# ---------------------------------------------------------------------------------------------

def _launch_all(case, device, config):
    """Forward, grad-input (+ grad U_in) and the factor sums through the launchers, against
    autograd through the dense reference."""
    ts = tensors(case, device)
    x, Uo, Ui, A, B, C, w, b = ts
    spec = lk3d.cp.check_cp_conv3d(x, lk3d.CPFactors(Uo, Ui, A, B, C, w), b, case.stride,
                                   case.padding, case.dilation, 1)
    geo = (spec.stride, spec.padding, spec.dilation)
    ref_ts = [None if t is None else t.detach().double().cpu().requires_grad_() for t in ts]
    want = _dense(ref_ts, case.args())
    y = cp_kernels.cp_conv3d_fwd(x, Uo, Ui, A, B, C, w, b, *geo, config)
    assert (err := rel_err(y, want)) < 1e-12, f"output: {err:.3g}"
    gy = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gx, gUo, gUi, gA, gB, gC, gw = torch.autograd.grad(want, ref_ts[:7], gy)
    dy = gy.to(device)
    dx, dUi = cp_kernels.cp_conv3d_bwd_input(dy, x, Uo, Ui, A, B, C, w, *geo, config,
                                             need_u_in=True)
    D, G = cp_kernels.cp_conv3d_bwd_factors(x, dy, Uo, Ui, A, B, C, w, *geo, config)
    got = {"input": dx, "U_in": dUi, "U_out": G * w, "weights": (G * Uo).sum(0),
           "A": torch.einsum("abcr,br,cr->ar", D, B, C)}
    for name, want_g in (("input", gx), ("U_in", gUi), ("U_out", gUo), ("weights", gw),
                         ("A", gA)):
        assert (err := rel_err(got[name], want_g)) < 1e-11, f"grad {name}: {err:.3g}"


@pytest.mark.parametrize("span", [True, False], ids=["span", "per-tap"])
def test_step_shapes_and_tiles_per_program(span, device):
    """17 and 18 channels with BLOCK_K=16: two channel blocks per tap (per-tap) or steps across
    tap boundaries (span); 32-voxel tiles, 2 programs: each sums several tiles into its partials."""
    case = CP(2, 17, 18, (3, 4, 5), (2, 2, 2), 3, stride=(1, 1, 2), padding=(1, 0, 0))
    _launch_all(case, device, dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, SPAN=span, SPLIT=2))


SHIPPED = [(kind, c) for kind in CONFIG_SPACES for c in CONFIG_SPACES[kind]]


@pytest.mark.parametrize("kind, config", SHIPPED,
                         ids=[f"{k}-" + "-".join(f"{n}{v}" for n, v in c.items())
                              for k, c in SHIPPED])
def test_shipped_config_runs(kind, config, device):
    """Each shipped config once: 33 input channels (a partial second channel block, per-tap
    steps) and a span case with 5; SPLIT=1: one program sums every tile into its partials."""
    cfg = dict(config, SPLIT=1)
    _launch_all(CP(1, 33, 5, (4, 3, 5), (2, 2, 2), 3, padding=(1, 0, 1)), device,
                dict(cfg, SPAN=False))
    _launch_all(CP(2, 5, 3, (5, 4, 6), (3, 2, 3), 17, stride=2, padding=1), device,
                dict(cfg, SPAN=True))


# ---------------------------------------------------------------------------------------------
# gradcheck, output masks, the kernels really run, no allocation but the output
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", [True, False], ids=["weights", "noweights"])
def test_gradcheck(weights, device):
    case = CP(1, 3, 2, (5, 5, 5), (3, 3, 3), 3, padding=1, weights=weights)
    ts = [None if t is None else t.requires_grad_() for t in tensors(case, device)]
    live = [t for t in ts if t is not None]

    def fn(*leaves):
        it = iter(leaves)
        return _cp([None if t is None else next(it) for t in ts], case.args())
    assert torch.autograd.gradcheck(fn, live, fast_mode=True)


MASKS = [
    [True, False, False, False, False, False, False],
    [False, False, True, False, False, False, False],
    [False, True, False, False, False, False, True],
    [False, False, False, False, True, False, False],
    [True, False, True, True, False, True, False],
]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "+".join(
    n for n, on in zip(NAMES, m) if on))
def test_backward_op_masks(mask, device, monkeypatch):
    """The backward op computes what its mask asks for (matching the torch path) and zeros for
    the rest; it launches only the kernels those need."""
    case = CP(1, 3, 4, (5, 6, 4), (3, 2, 3), 3, stride=(1, 2, 1), padding=(1, 0, 1))
    x, *f, _ = tensors(case, device)
    args = ([1, 2, 1], [1, 0, 1, 1, 0, 1], [1, 1, 1])
    gy = torch.randn(1, 4, 5, 3, 4, dtype=torch.float64, device=device)
    want = cp_ops.cp_conv3d_torch_backward(gy, x, *f, *args, [True] * 7)
    launched = []
    for name in ("cp_conv3d_bwd_input", "cp_conv3d_bwd_factors"):
        fn = getattr(cp_kernels, name)
        monkeypatch.setattr(cp_kernels, name,
                            lambda *a, _fn=fn, _n=name, **k: launched.append(_n) or _fn(*a, **k))
    got = torch.ops.lk3d.cp_conv3d_backward(gy, x, *f, *args, mask)
    for name, on, g, w in zip(NAMES, mask, got, want):
        if on:
            assert (err := rel_err(g, w)) < 1e-12, f"grad {name}: {err:.3g}"
        else:
            assert g.shape == w.shape and not g.any(), name
    expect = {"cp_conv3d_bwd_input": mask[0] or mask[2],
              "cp_conv3d_bwd_factors": any(mask[i] for i in (1, 3, 4, 5, 6))}
    assert {n: n in launched for n in expect} == expect


def test_kernels_used(device, monkeypatch):
    """With the torch sequence made to fail, forward and backward still work: the kernels ran."""
    def fail(*args, **kwargs):
        raise AssertionError("the torch path ran")
    for op in ("cp_conv3d", "cp_conv3d_backward"):  # the torch sequence
        monkeypatch.setattr(registry.get(op, "aten"), "run", fail)
    _check_against_dense(CASES[0], device)


def test_plans_and_forcing(device, monkeypatch):
    """Under the interpreter the kernels are the plan; LK3D_ALGO=aten forces the torch sequence
    (no kernel runs, same result); a dtype the kernels do not take leaves only the sequence."""
    case = CASES[0]
    x, *f, b = tensors(case, device)
    factors = lk3d.CPFactors(*f)
    plans = cp_ops.explain(x, factors, b, **case.args())
    assert set(plans) == {"forward", "backward"}
    if device.type == "cpu":
        assert {p["algo"] for p in plans.values()} == {"tiled"}

    def fail(*args, **kwargs):
        raise AssertionError("a kernel ran")
    for name in ("cp_conv3d_fwd", "cp_conv3d_bwd_input", "cp_conv3d_bwd_factors"):
        monkeypatch.setattr(cp_kernels, name, fail)
    monkeypatch.setenv("LK3D_ALGO", "aten")
    plans = cp_ops.explain(x, factors, b, **case.args())
    assert {(p["algo"], p["source"]) for p in plans.values()} == {("aten", "forced")}
    _check_against_dense(case, device)
    monkeypatch.delenv("LK3D_ALGO")
    half = lk3d.CPFactors(*(t.to(torch.bfloat16) for t in f))
    plans = cp_ops.explain(x.to(torch.bfloat16), half, **case.args())
    if device.type == "cpu":
        assert {(p["algo"], p["source"]) for p in plans.values()} == {("aten", "only")}


def test_unserved_dtype_takes_torch_path(monkeypatch):
    """bf16 on the CPU (the interpreter's bf16 tl.dot is wrong) stays on the torch sequence."""
    def fail(*args, **kwargs):
        raise AssertionError("a kernel ran")
    monkeypatch.setattr(cp_kernels, "cp_conv3d_fwd", fail)
    case = CASES[0]
    ts = tensors(case, "cpu", torch.bfloat16)
    want = _dense([None if t is None else t.double() for t in ts], case.args())
    assert rel_err(_cp(ts, case.args()), want) < 4 * TOL[torch.bfloat16]


@pytest.mark.skipif(DEVICE != "cpu", reason="counts CPU allocations")
def test_forward_allocates_only_its_output():
    """The profiler sees one allocation in the forward: the output. The torch sequence, by
    contrast, allocates [N, R, D, H, W] intermediates (checked too, so the probe is live)."""
    from torch.profiler import ProfilerActivity, profile
    case = CP(1, 3, 2, (6, 7, 5), (3, 3, 3), 17, padding="same")
    x, *f, b = tensors(case, "cpu")
    z_bytes = x.shape[0] * case.rank * x[0, 0].numel() * x.element_size()

    def allocations(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            y = fn()
        return y, [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]

    y, sizes = allocations(lambda: lk3d.cp_conv3d(x, lk3d.CPFactors(*f), b, padding="same"))
    out_bytes = y.numel() * y.element_size()
    assert out_bytes < z_bytes
    # Besides the output only scalars: the sums of the finiteness check, nothing of the size of
    # an intermediate.
    assert sorted(sizes)[-1] == out_bytes and sizes.count(out_bytes) == 1
    assert all(s <= x.element_size() for s in sizes if s != out_bytes)
    _, torch_sizes = allocations(lambda: cp_ops.cp_conv3d_torch(
        x, *f, b, [1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1]))
    assert max(torch_sizes) >= z_bytes
