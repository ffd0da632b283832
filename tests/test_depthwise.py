"""The channels-innermost depthwise kernels (``lk3d.kernels.depthwise``) against a float64
F.conv3d reference: through ``lk3d.conv3d`` (which routes channel multiplier 1 over C % 8 == 0
channels to them) and through their launchers (bf16, explicit configs with ragged tiles).
Every buffer a launcher allocates starts as NaN."""
import pytest
import torch
import torch.nn.functional as F

import lk3d
from _cases import TOL, Case, assert_layout_kept, rel_err, strided_copy
from lk3d._algos import direct_depthwise
from lk3d.kernels import common, depthwise_configs
from lk3d.tools import launch_record


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(common, "POISON", True)


CASES = [
    Case(2, 8, 8, (3, 2, 7), (3, 3, 3), padding="same", groups=8),
    # even kernel sides: "same" pads asymmetrically; dilation along W
    Case(1, 8, 8, (2, 3, 9), (2, 1, 4), padding="same", dilation=(1, 1, 2), groups=8),
    # stride: the forward on the new kernel, grad-input on the strided one
    Case(1, 16, 16, (3, 3, 11), (3, 2, 3), stride=(2, 1, 2), padding=(1, 0, 2),
         dilation=(1, 1, 2), groups=16, bias=False),
    # 24 channels: a masked channel tail in a 32-wide block
    Case(1, 24, 24, (2, 3, 6), (1, 3, 5), padding=(0, 1, 1), groups=24),
]


def _grads(case, dtype, device, x=None, w=None, b=None):
    """(lk3d's output and gradients, float64 reference output and gradients) of ``case``."""
    if x is None:
        x, w, b = case.tensors(dtype=dtype, device=device)
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    y = lk3d.conv3d(x, w, b, **case.args())
    refs = [t.detach().double().cpu().requires_grad_() for t in (x, w, b) if t is not None]
    ref = F.conv3d(*refs, *(() if b is not None else (None,)), **case.args())
    gy = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], gy.to(y))
    want = torch.autograd.grad(ref, refs, gy)
    return (y, *got), (ref, *want)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_backward_float64(case, device):
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    (y, *grads), (ref, *refs) = _grads(case, dtype, device)
    assert y.dtype == dtype and y.is_contiguous()
    assert rel_err(y, ref) < TOL[dtype]
    for name, got, want in zip(("input", "weight", "bias"), grads, refs):
        assert rel_err(got, want) < TOL[dtype] * 10, name


def test_gradcheck(device):
    """float64 gradcheck through the channels-innermost kernels (forward, grad-input and
    grad-weight all take them: 8 channels, stride 1), 'same' with an even kernel side."""
    if device.type != "cpu":
        pytest.skip("float64: the kernels take it under the interpreter only")
    case = Case(1, 8, 8, (3, 2, 4), (2, 2, 3), padding="same", groups=8)
    x, w, b = (t.detach().requires_grad_() for t in case.tensors(dtype=torch.float64))
    assert {p["algo"] for p in lk3d.explain(x, w, b, **case.args()).values()} == {"tiled"}
    assert torch.autograd.gradcheck(lambda *t: lk3d.conv3d(*t, **case.args()), (x, w, b),
                                    fast_mode=True)


def test_routes(device):
    """Multiplier 1 over C % 8 == 0 takes the new kernel (grad-input at stride 1 only); the rest
    the one-voxel-per-lane kernel."""
    def kernel(conv, pass_):
        return {ln.name for ln in launch_record.launches(conv, pass_, 90)[2]}

    new, old = {"conv3d_dw_cl_kernel"}, {"conv3d_dw_kernel"}
    new_wgrad, old_wgrad = {"conv3d_dw_cl_wgrad_kernel"}, {"conv3d_dw_wgrad_kernel"}
    conv = launch_record.Conv((1, 16, 9, 9, 9), (16, 1, 3, 3, 3), groups=16, padding="same")
    assert kernel(conv, "forward") == kernel(conv, "grad_input") == new
    assert kernel(conv, "grad_weight") == new_wgrad
    strided = launch_record.Conv((1, 16, 9, 9, 9), (16, 1, 3, 3, 3), groups=16, stride=2)
    assert kernel(strided, "forward") == new and kernel(strided, "grad_input") == old
    assert kernel(strided, "grad_weight") == new_wgrad
    for conv in (launch_record.Conv((1, 12, 9, 9, 9), (12, 1, 3, 3, 3), groups=12),
                 launch_record.Conv((1, 8, 9, 9, 9), (16, 1, 3, 3, 3), groups=8)):
        assert kernel(conv, "forward") == old and kernel(conv, "grad_weight") == old_wgrad
    assert not direct_depthwise("conv3d", (1, 8, 3, 3, 3), (16, 1, 3, 3, 3), (1, 1, 1))
    assert direct_depthwise("conv3d_grad_weight", (1, 8, 3, 3, 3), (8, 1, 3, 3, 3), (2, 1, 3))


@pytest.mark.parametrize("layout", ["channels_last_3d", "strided"])
def test_layouts(layout, device):
    """An NDHWC input is read in place and gives an NDHWC output; a strided input (with a
    strided weight and bias) is copied once and gives an NCDHW-contiguous output, as F.conv3d's;
    nothing the caller passed changes."""
    assert_layout_kept(CASES[0], layout, device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=lambda d: str(d).split(".")[1])
def test_launchers_dtypes_ragged_tiles(dtype, device):
    """Forward (stride 2 along W, with bias) and grad-input (stride 1) through the launchers with
    tiles that do not divide the row or the channels: 3 programs along W, a partial channel block;
    bf16 reads channel pairs as int32."""
    from lk3d.kernels import depthwise

    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 24, 2, 2, 13, dtype=torch.float64, generator=g)
    w = torch.randn(24, 1, 2, 1, 3, dtype=torch.float64, generator=g)
    b = torch.randn(24, dtype=torch.float64, generator=g)
    x, w, b = (t.to(dtype=dtype, device=device) for t in (x, w, b))
    config = dict(BLOCK_V=2, BLOCK_C=16, R=3, num_warps=1)
    pad, dil = (1, 0, 2, 0, 0, 1), (1, 1, 2)
    y = depthwise.conv3d_dw_cl_fwd(x, w, b, (1, 1, 2), pad, dil, config)
    xp = F.pad(x.double().cpu(), (2, 1, 0, 0, 1, 0))
    ref = F.conv3d(xp, w.double().cpu(), b.double().cpu(), stride=(1, 1, 2), dilation=dil,
                   groups=24)
    assert y.shape == ref.shape and rel_err(y, ref) < TOL[dtype]

    xr = xp.requires_grad_()
    out = F.conv3d(xr, w.double().cpu(), None, dilation=dil, groups=24)
    gy = torch.randn(out.shape, dtype=torch.float64, generator=g)
    gref = torch.autograd.grad(out, xr, gy)[0][:, :, 1:, :, 2:-1]
    gx = depthwise.conv3d_dw_cl_bwd_input(gy.to(dtype=dtype, device=device), w, x.shape,
                                          (1, 1, 1), pad, dil, config)
    assert gx.shape == x.shape and rel_err(gx, gref) < TOL[dtype]


def test_nonfinite_placement(device):
    """NaN/Inf where F.conv3d puts them: a NaN input voxel spreads over the outputs it reaches;
    an Inf weight tap makes NaN where it meets the zero padding (0·Inf) and Inf elsewhere;
    grad-input with that weight too, and grad-weight with that input."""
    case = CASES[0]
    x, w, b = case.tensors(dtype=torch.float32, device=device)
    x[0, 1, 1, 0, 3] = float("nan")
    w[2, 0, 0, 1, 2] = float("inf")
    x, w = x.requires_grad_(), w.requires_grad_()
    y = lk3d.conv3d(x, w, b, **case.args())
    xr, wr = x.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    ref = F.conv3d(xr, wr, b.double().cpu(), **case.args())
    for got, want in ((y, ref),
                      (torch.autograd.grad(y, x, torch.ones_like(y), retain_graph=True)[0],
                       torch.autograd.grad(ref, xr, torch.ones_like(ref), retain_graph=True)[0]),
                      (torch.autograd.grad(y, w, torch.ones_like(y))[0],
                       torch.autograd.grad(ref, wr, torch.ones_like(ref))[0])):
        got = got.detach().double().cpu()
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.isinf(), want.isinf())
        fin = want.isfinite()
        assert rel_err(got[fin], want[fin]) < TOL[torch.float32]


@pytest.mark.parametrize("config", depthwise_configs.CONV3D_DW_CL_CONFIGS,
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_shipped_configs(config, device):
    """Every shipped config, forward and grad-input, in float64 (fp32 on a GPU)."""
    from lk3d.kernels import depthwise

    dtype = torch.float64 if device.type == "cpu" else torch.float32
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 2, 2, 9, dtype=torch.float64, generator=g)
    w = torch.randn(16, 1, 3, 3, 3, dtype=torch.float64, generator=g)
    b = torch.randn(16, dtype=torch.float64, generator=g)
    ref = F.conv3d(x, w, b, padding=1, groups=16)
    geo = ((1, 1, 1), (1,) * 6, (1, 1, 1))
    y = depthwise.conv3d_dw_cl_fwd(*(t.to(dtype=dtype, device=device) for t in (x, w, b)), *geo,
                                   config)
    assert rel_err(y, ref) < TOL[dtype]
    gy = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    want = torch.nn.grad.conv3d_input(x.shape, w, gy, padding=1, groups=16)
    got = depthwise.conv3d_dw_cl_bwd_input(gy.to(dtype=dtype, device=device),
                                           w.to(dtype=dtype, device=device), x.shape, *geo, config)
    assert rel_err(got, want) < TOL[dtype]


def _wgrad_ref(x, gy, kernel, stride, pad, dil):
    """Float64 grad-weight of F.conv3d with padding given as six ints (left, then right)."""
    xp = F.pad(x.detach().double().cpu(), (pad[2], pad[5], pad[1], pad[4], pad[0], pad[3]))
    w = torch.zeros(x.shape[1], 1, *kernel, dtype=torch.float64, requires_grad=True)
    y = F.conv3d(xp, w, stride=stride, dilation=dil, groups=x.shape[1])
    return torch.autograd.grad(y, w, gy.detach().double().cpu())[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=lambda d: str(d).split(".")[1])
def test_wgrad_launcher_dtypes_ragged_tiles(dtype, device):
    """Grad-weight through the launcher, batch 2, stride 2 along W with dilation, asymmetric
    padding: 5 W taps in strips of 3 (a masked tap), a partial channel block, strips past the
    row's end, and a SPLIT that leaves some programs no rows (their poisoned partials must still
    be written); non-contiguous operands, left unchanged."""
    from lk3d.kernels import depthwise

    g = torch.Generator().manual_seed(4)
    x = strided_copy(torch.randn(2, 24, 3, 2, 17, dtype=torch.float64, generator=g).to(dtype))
    kernel, stride, pad, dil = (2, 1, 5), (1, 1, 2), (1, 0, 2, 0, 0, 1), (2, 1, 2)
    gy = torch.randn(2, 24, 2, 2, 6, dtype=torch.float64, generator=g)
    want = _wgrad_ref(x, gy, kernel, stride, pad, dil)
    gy = strided_copy(gy.to(dtype))
    x, gy = x.to(device), gy.to(device)
    before = [t.clone() for t in (x, gy)]
    config = dict(BLOCK_V=2, BLOCK_C=16, R=2, KT=3, SPLIT=7, num_warps=1)
    got = depthwise.conv3d_dw_cl_bwd_weight(x, gy, (24, 1, *kernel), stride, pad, dil, config)
    assert got.dtype == dtype and rel_err(got, want) < TOL[dtype]
    assert all(torch.equal(t, t0) for t, t0 in zip((x, gy), before))


@pytest.mark.parametrize("config", depthwise_configs.CONV3D_DW_CL_WGRAD_CONFIGS,
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_shipped_wgrad_configs(config, device):
    """Every shipped grad-weight config, in float64 (fp32 on a GPU), split in 3."""
    from lk3d.kernels import depthwise

    dtype = torch.float64 if device.type == "cpu" else torch.float32
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 3, 2, 9, dtype=torch.float64, generator=g)
    gy = torch.randn(1, 16, 3, 2, 9, dtype=torch.float64, generator=g)
    geo = ((1, 1, 1), (1,) * 6, (1, 1, 1))
    want = _wgrad_ref(x, gy, (3, 3, 3), *geo)
    got = depthwise.conv3d_dw_cl_bwd_weight(x.to(dtype=dtype, device=device),
                                            gy.to(dtype=dtype, device=device), (16, 1, 3, 3, 3),
                                            *geo, dict(config, SPLIT=3))
    assert rel_err(got, want) < TOL[dtype]


def test_wgrad_executed_flops():
    """The grad-weight's executed FLOPs count only the grad-output rows whose input row is
    inside: with no padding every row is, and the count is the useful one scaled by the padded
    extents (W strips, channel blocks, strips of W taps); with padding the border rows drop."""
    valid = launch_record.Conv((1, 40, 6, 5, 11), (40, 1, 3, 2, 5), groups=40)
    _, config, (launch,) = launch_record.launches(valid, "grad_weight", 90)
    a = launch.args
    covered = a["NUM_W"] * a["BLOCK_V"] * a["R"]
    channels = -(-40 // config["BLOCK_C"]) * config["BLOCK_C"]
    taps = -(-5 // a["KT"]) * a["KT"]
    useful = launch_record.useful_flops(valid, "grad_weight")
    assert launch_record.executed_flops(launch) * 7 * 40 * 5 == useful * covered * channels * taps
    padded = launch_record.Conv((1, 40, 6, 5, 11), (40, 1, 3, 2, 5), groups=40, padding=(1, 1, 2))
    _, _, (launch,) = launch_record.launches(padded, "grad_weight", 90)
    a = launch.args
    covered = a["NUM_W"] * a["BLOCK_V"] * a["R"]
    # D: 6 outputs, taps 0 and 2 miss one border row each (16 of 18 rows); H: 6 outputs, each
    # tap misses one (10 of 12); W: 11 outputs
    assert launch_record.executed_flops(launch) * 18 * 12 * 11 * 40 * 5 == (
        launch_record.useful_flops(padded, "grad_weight") * 16 * 10 * covered * channels * taps)
