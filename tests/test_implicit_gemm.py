"""The tensor-descriptor implicit GEMM (``lk3d.kernels.implicit_gemm``) against a float64
F.conv3d reference: through ``lk3d.conv3d`` (which routes dense and grouped convolutions with a
multiple of 16 reduction channels per group, stride 1 along H and W, to it; grad-input at stride
1) and through its launchers, with descriptors (TMA on sm_90) and with pointers (sm_80).
Every buffer a launcher allocates starts as NaN."""
import pytest
import torch
import torch.nn.functional as F

import lk3d
from _cases import TOL, Case, assert_layout_kept, raises_naming, rel_err
from lk3d._algos import descriptor_gemm
from lk3d.kernels import common, implicit_gemm_configs
from lk3d.tools import launch_record


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(common, "POISON", True)


CASES = [
    Case(2, 16, 32, (3, 5, 7), (3, 3, 3), padding="same"),
    # even kernel sides: "same" pads asymmetrically; groups; dilation along H
    Case(1, 32, 32, (4, 5, 9), (2, 3, 2), padding="same", dilation=(1, 2, 1), groups=2),
    # stride along D: the forward on the descriptors, grad-input on the gather kernel, and
    # grad-weight too (Cout/g = 24)
    Case(1, 16, 24, (5, 4, 6), (3, 1, 3), stride=(2, 1, 1), padding=(1, 0, 2), bias=False),
]
PASS_KERNELS = {  # the kernels each case's forward, grad-input and grad-weight launch
    CASES[0].id: ("conv3d_desc_kernel", "conv3d_desc_kernel", "conv3d_desc_wgrad_kernel"),
    CASES[1].id: ("conv3d_desc_kernel", "conv3d_desc_kernel", "conv3d_desc_wgrad_kernel"),
    CASES[2].id: ("conv3d_desc_kernel", "conv3d_igemm_kernel", "conv3d_wgrad_kernel"),
}


def _kernel_dtype(device):
    return torch.float32  # the descriptors take fp16/bf16/fp32; fp64 goes to the gather kernel


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_backward(case, device, no_tf32):
    """Output and every gradient against float64; the forward and grad-input launch the kernels
    the routing names."""
    dtype = _kernel_dtype(device)
    x, w, b = case.tensors(dtype=dtype, device=device)
    x, w = x.requires_grad_(), w.requires_grad_()
    b = None if b is None else b.requires_grad_()
    with launch_record.interpreted_compile_keys() as keys:
        y = lk3d.conv3d(x, w, b, **case.args())
        forward = [k["kernel"] for k in keys]
        gy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], gy.to(y))
    if device.type == "cpu":
        assert forward == [PASS_KERNELS[case.id][0]]
        launched = [k["kernel"] for k in keys]
        assert all(name in launched for name in PASS_KERNELS[case.id][1:])
    refs = [t.detach().double().cpu().requires_grad_() for t in (x, w, b) if t is not None]
    ref = F.conv3d(*refs, *(() if b is not None else (None,)), **case.args())
    assert y.dtype == dtype and rel_err(y, ref) < TOL[dtype]
    for name, got, want in zip(("input", "weight", "bias"), grads,
                               torch.autograd.grad(ref, refs, gy)):
        assert rel_err(got, want) < TOL[dtype] * 10, name


def test_routes():
    """What takes the descriptor kernel (sm_90 and sm_80 alike; operands by arch), what stays on
    the gather kernel."""
    def kernel(conv, pass_, arch=90):
        return [ln.name for ln in launch_record.launches(conv, pass_, arch)[2]]

    desc, gather = ["conv3d_desc_kernel"], ["conv3d_igemm_kernel"]
    g3 = launch_record.Conv((1, 64, 9, 9, 9), (64, 64, 7, 7, 7), padding="same")
    for arch in (90, 80):
        assert kernel(g3, "forward", arch) == kernel(g3, "grad_input", arch) == desc
    sm90, sm80 = (launch_record.launches(g3, "forward", arch)[2][0] for arch in (90, 80))
    assert sm90.args["TMA"] and not sm80.args["TMA"]
    # stride along D only: forward on descriptors, grad-input (stride 2) on the gather kernel
    strided_d = launch_record.Conv((1, 32, 9, 9, 9), (32, 32, 3, 3, 3), stride=(2, 1, 1))
    assert kernel(strided_d, "forward") == desc and kernel(strided_d, "grad_input") == gather
    # stride along H or W, or too few channels per group: the gather kernel
    for conv in (launch_record.Conv((1, 32, 9, 9, 9), (32, 32, 3, 3, 3), stride=2),
                 launch_record.Conv((1, 8, 9, 9, 9), (16, 8, 3, 3, 3)),
                 launch_record.Conv((1, 48, 9, 9, 9), (48, 8, 3, 3, 3), groups=6)):
        assert kernel(conv, "forward") == gather
    # grad-input reduces over Cout/g: 32 -> 24 channels fits the forward only
    conv = launch_record.Conv((1, 32, 9, 9, 9), (24, 32, 3, 3, 3))
    assert kernel(conv, "forward") == desc and kernel(conv, "grad_input") == gather
    assert descriptor_gemm("conv3d", (1, 16, 4, 4, 4), (16, 16, 3, 3, 3), (1, 1, 1), 1,
                           torch.float16)
    assert not descriptor_gemm("conv3d", (1, 16, 4, 4, 4), (16, 16, 3, 3, 3), (1, 1, 1), 1,
                               torch.float64)
    assert not descriptor_gemm("conv3d", (1, 16, 4, 4, 4), (16, 1, 3, 3, 3), (1, 1, 1), 16,
                               torch.float32)  # depthwise: its own kernels
    assert not descriptor_gemm("conv3d_grad_input", (1, 16, 4, 4, 4), (0, 16, 3, 3, 3),
                               (1, 1, 1), 1, torch.float32)  # nothing to reduce over


def test_config_choice():
    """The default config: produced channels' block up to 128, the widest channel block dividing
    the reduction channels, within the device's shared memory; the configs worth measuring are
    the ones whose BLOCK_K divides the reduction channels."""
    from lk3d._algos import tiled_configs
    from lk3d.autotune.configs import SMEM_LIMIT, Problem

    def pick(kc, nc, major=9, size=2):
        p = Problem("conv3d_desc", M=10**6, KC=kc, NC=nc)
        c = implicit_gemm_configs.pick(p, SMEM_LIMIT[major], size)
        return c["BLOCK_N"], c["BLOCK_K"], c["num_warps"]

    assert pick(64, 64) == (64, 64, 4)
    assert pick(64, 256) == (128, 64, 8)
    assert pick(48, 64) == (64, 16, 4)  # 48 channels: blocks of 16
    assert pick(96, 40) == (64, 32, 4)
    assert pick(64, 128, major=8, size=4) == (64, 64, 4)  # fp32 128 x 128 x 64 tiles: 196 KB
    assert pick(16, 16) == (16, 16, 4)
    found = tiled_configs("conv3d", (1, 48, 9, 9, 9), (64, 48, 3, 3, 3), (1, 1, 1), (1,) * 6,
                          (1, 1, 1), 1, torch.float16, torch.device("cpu"))
    assert found and all(48 % c["BLOCK_K"] == 0 for c in found)


@pytest.mark.parametrize("layout", ["channels_last_3d", "strided"])
def test_layouts(layout, device, no_tf32):
    """An NDHWC input gives an NDHWC output; a strided input (with a strided weight and bias)
    an NCDHW-contiguous one, as F.conv3d's; nothing the caller passed changes."""
    assert_layout_kept(CASES[1], layout, device)


@pytest.mark.parametrize("tma", [True, False], ids=["descriptors", "pointers"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=lambda d: str(d)[6:])
def test_launchers_ragged_tiles(tma, dtype, device, no_tf32):
    """Forward (with bias; dilation, padding past the kernel's reach) and grad-input through the
    launchers, tiles that divide neither the output plane nor the produced channels (24 in
    blocks of 16); both operand paths."""
    from lk3d.kernels import implicit_gemm

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 32, 3, 5, 11, dtype=torch.float64, generator=g)
    w = torch.randn(24, 16, 2, 3, 2, dtype=torch.float64, generator=g)
    b = torch.randn(24, dtype=torch.float64, generator=g)
    xk, wk, bk = (t.to(dtype=dtype, device=device) for t in (x, w, b))
    config = dict(BLOCK_H=4, BLOCK_W=8, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=2)
    pad, dil = (1, 3, 0, 0, 1, 2), (2, 1, 2)
    y = implicit_gemm.conv3d_desc_fwd(xk, wk, bk, (1, 1, 1), pad, dil, 2, config, tma=tma)
    xp = F.pad(x, (0, 2, 3, 1, 1, 0))
    ref = F.conv3d(xp, w, b, dilation=dil, groups=2)
    assert y.shape == ref.shape and rel_err(y, ref) < TOL[dtype]

    w2 = torch.randn(32, 16, 2, 3, 2, dtype=torch.float64, generator=g)  # 16 = Cout/g reduced
    xr = xp.clone().requires_grad_()
    out = F.conv3d(xr, w2, None, dilation=dil, groups=2)
    gy = torch.randn(out.shape, dtype=torch.float64, generator=g)
    gref = torch.autograd.grad(out, xr, gy)[0][:, :, 1:, 3:-1, :-2]
    gx = implicit_gemm.conv3d_desc_bwd_input(gy.to(dtype=dtype, device=device),
                                             w2.to(dtype=dtype, device=device), x.shape,
                                             (1, 1, 1), pad, dil, 2, config, tma=tma)
    assert gx.shape == x.shape and rel_err(gx, gref) < TOL[dtype]


def test_nonfinite_placement(device, no_tf32):
    """NaN/Inf where F.conv3d puts them: a NaN input voxel spreads over the outputs it reaches;
    an Inf weight tap makes NaN where it meets the zero padding (0·Inf: the descriptors' zero
    fill) and Inf elsewhere; grad-input with that weight too (aten's, as the gather kernel's)."""
    case = CASES[0]
    x, w, b = case.tensors(dtype=torch.float32, device=device)
    x[1, 3, 1, 0, 4] = float("nan")
    w[5, 2, 0, 1, 2] = float("inf")
    x, w = x.requires_grad_(), w.requires_grad_()
    y = lk3d.conv3d(x, w, b, **case.args())
    xr, wr = x.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    ref = F.conv3d(xr, wr, b.double().cpu(), **case.args())
    assert ref.isnan().any() and ref.isinf().any()
    for got, want in ((y, ref),
                      (torch.autograd.grad(y, x, torch.ones_like(y))[0],
                       torch.autograd.grad(ref, xr, torch.ones_like(ref))[0])):
        got = got.detach().double().cpu()
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.isinf(), want.isinf())
        fin = want.isfinite()
        assert rel_err(got[fin], want[fin]) < TOL[torch.float32]


@pytest.mark.parametrize("tma", [True, False], ids=["descriptors", "pointers"])
@pytest.mark.parametrize("config", implicit_gemm_configs.CONV3D_DESC_CONFIGS,
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_shipped_configs(config, tma, device, no_tf32):
    """Every shipped config, forward (with bias) and grad-input, 64 -> 64 channels, fp32."""
    from lk3d.kernels import implicit_gemm

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 64, 2, 3, 5, dtype=torch.float64, generator=g)
    w = torch.randn(64, 64, 2, 1, 3, dtype=torch.float64, generator=g)
    b = torch.randn(64, dtype=torch.float64, generator=g)
    ref = F.conv3d(x, w, b, padding=1)
    geo = ((1, 1, 1), (1,) * 6, (1, 1, 1))
    xk, wk, bk = (t.to(dtype=torch.float32, device=device) for t in (x, w, b))
    y = implicit_gemm.conv3d_desc_fwd(xk, wk, bk, *geo, 1, config, tma=tma)
    assert rel_err(y, ref) < TOL[torch.float32]
    gy = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    want = torch.nn.grad.conv3d_input(x.shape, w, gy, padding=1)
    got = implicit_gemm.conv3d_desc_bwd_input(gy.to(dtype=torch.float32, device=device), wk,
                                              x.shape, *geo, 1, config, tma=tma)
    assert rel_err(got, want) < TOL[torch.float32]


def test_launcher_errors(device):
    """The launchers refuse what the descriptors cannot serve, naming the argument, the
    expectation and the value given."""
    from lk3d.kernels import implicit_gemm

    config = dict(BLOCK_H=8, BLOCK_W=8, BLOCK_N=16, BLOCK_K=32)
    geo = ((1, 1, 1), (0,) * 6, (1, 1, 1))
    x, w = torch.randn(1, 8, 3, 3, 3, device=device), torch.randn(8, 8, 1, 1, 1, device=device)
    with raises_naming(ValueError, ["input", "16", "got 8 channels"]):
        implicit_gemm.conv3d_desc_fwd(x, w, None, *geo, 1, config)
    x, w = torch.randn(1, 48, 3, 3, 3, device=device), torch.randn(8, 48, 1, 1, 1, device=device)
    with raises_naming(ValueError, ["config", "BLOCK_K", "48", "got 32"]):
        implicit_gemm.conv3d_desc_fwd(x, w, None, *geo, 1, config)
    with raises_naming(ValueError, ["input", "stride", "(1, 2, 1)"]):
        implicit_gemm.conv3d_desc_fwd(x, w, None, (1, 2, 1), (0,) * 6, (1, 1, 1), 1,
                                      dict(config, BLOCK_K=16))
    dy = torch.randn(1, 16, 2, 2, 2, device=device)
    with raises_naming(ValueError, ["stride", "(1, 1, 1)", "(2, 1, 1)"]):
        implicit_gemm.conv3d_desc_bwd_input(dy, torch.randn(16, 16, 1, 1, 1, device=device),
                                            (1, 16, 4, 2, 2), (2, 1, 1), (0,) * 6, (1, 1, 1), 1,
                                            dict(config, BLOCK_K=16))


def test_axes_of_extent_one(device, no_tf32):
    """Inputs whose spatial axes have extent 1 (torch then keeps strides a descriptor cannot
    take, e.g. 1 for D, H and W of [2, 16, 1, 1, 1]): the descriptors use the dense NDHWC
    strides."""
    from lk3d.kernels import implicit_gemm

    g = torch.Generator().manual_seed(4)
    config = dict(BLOCK_H=8, BLOCK_W=8, BLOCK_N=16, BLOCK_K=16)
    for shape, kernel, pad in (((2, 16, 1, 1, 1), (1, 1, 1), (0, 0, 0)),
                               ((1, 16, 3, 1, 1), (3, 1, 1), (1, 0, 0))):
        x = torch.randn(shape, dtype=torch.float64, generator=g)
        w = torch.randn(16, 16, *kernel, dtype=torch.float64, generator=g)
        xk = x.to(dtype=torch.float32, device=device)
        if shape[0] == 1:
            xk = xk.contiguous(memory_format=torch.channels_last_3d)
        y = implicit_gemm.conv3d_desc_fwd(xk, w.to(xk), None, (1, 1, 1), pad + pad, (1, 1, 1), 1,
                                          config, tma=True)
        assert rel_err(y, F.conv3d(x, w, padding=pad)) < TOL[torch.float32]
