"""The tensor-descriptor implicit GEMM (``lk3d.kernels.implicit_gemm``) against a float64
F.conv3d reference: through ``lk3d.conv3d`` (which routes dense and grouped convolutions with a
multiple of 16 reduction channels per group, the forward at stride 1 along H and W, grad-input at
any stride by stride phases, to it) and through its launchers, with descriptors (TMA on sm_90)
and with pointers (sm_80). Every buffer a launcher allocates starts as NaN."""
import itertools
import math

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
    # stride along D: the forward on the descriptors; grad-input (Cout/g = 24) and grad-weight
    # on the gather kernels
    Case(1, 16, 24, (5, 4, 6), (3, 1, 3), stride=(2, 1, 1), padding=(1, 0, 2), bias=False),
    # stride along every axis, dilation sharing a factor with the stride along W: the forward
    # on the gather kernel, grad-input by phases on the descriptors
    Case(1, 24, 16, (5, 7, 8), (2, 3, 3), stride=(2, 3, 2), padding=(1, 2, 1),
         dilation=(1, 1, 2)),
]
PASS_KERNELS = {  # the kernels each case's forward, grad-input and grad-weight launch
    CASES[0].id: ("conv3d_desc_kernel", "conv3d_desc_kernel", "conv3d_desc_wgrad_kernel"),
    CASES[1].id: ("conv3d_desc_kernel", "conv3d_desc_kernel", "conv3d_desc_wgrad_kernel"),
    CASES[2].id: ("conv3d_desc_kernel", "conv3d_igemm_kernel", "conv3d_wgrad_kernel"),
    CASES[3].id: ("conv3d_igemm_kernel", "conv3d_desc_kernel", "conv3d_wgrad_kernel"),
}


def _kernel_dtype(device):
    return torch.float32  # the descriptors take fp16/bf16/fp32; fp64 goes to the gather kernel


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_backward(case, device, no_tf32):
    """Output and every gradient against float64; each pass launches the kernels the routing
    names."""
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
        backward = {k["kernel"] for k in keys[len(forward):]}
        assert backward == {*PASS_KERNELS[case.id][1:], *(("bias_grad_kernel",) if case.bias
                                                          else ())}
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
    # stride along D only: forward on descriptors, grad-input one launch per stride phase
    strided_d = launch_record.Conv((1, 32, 9, 9, 9), (32, 32, 3, 3, 3), stride=(2, 1, 1))
    assert kernel(strided_d, "forward") == desc and kernel(strided_d, "grad_input") == desc * 2
    # stride along H or W: the forward on the gather kernel, grad-input by phases
    strided = launch_record.Conv((1, 32, 9, 9, 9), (32, 32, 3, 3, 3), stride=2)
    assert kernel(strided, "forward") == gather and kernel(strided, "grad_input") == desc * 8
    # too few channels per group: the gather kernel
    for conv in (launch_record.Conv((1, 8, 9, 9, 9), (16, 8, 3, 3, 3)),
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


def test_phase_launches_recorded():
    """A strided grad-input records one launch per stride phase with taps, each over its
    sub-kernel only (executed FLOPs near the useful ones, where the gather kernel runs every tap
    at every input voxel); the launcher's copies count each packed sub-kernel once (together
    the weight), and the NDHWC copy of grad_output and the zero fill of the phases no tap reaches
    once."""
    # D: stride 3, dilation 2: three phases of one tap; H: stride 2 = dilation: the even phase
    # takes all four taps, the odd one none (zeros); W: stride 2: phases of two and one taps
    conv = launch_record.Conv((1, 32, 12, 32, 64), (32, 32, 3, 4, 3), stride=(3, 2, 2),
                              dilation=(2, 2, 1))
    variant, _, recorded = launch_record.launches(conv, "grad_input", 90)
    assert variant == "descriptor" and len(recorded) == 6
    taps = sorted(ln.args["KD"] * ln.args["KH"] * ln.args["KW"] for ln in recorded)
    assert taps == [4, 4, 4, 8, 8, 8] and sum(taps) == math.prod(conv.weight[2:])
    useful = launch_record.useful_flops(conv, "grad_input")
    executed = sum(launch_record.executed_flops(ln) for ln in recorded)
    gather = launch_record.tiled_launches(conv, "grad_input", 90, fallback=True)[2]
    assert useful <= executed < 2 * useful < launch_record.executed_flops(gather[0]) / 10
    dy = conv.input[0] * conv.weight[0] * 3 * 13 * 31  # grad_output [1, 32, 3, 13, 31]
    zeros = math.prod(conv.input) // 2                  # the odd rows along H
    assert sum(ln.copied for ln in recorded) == 2 * (2 * math.prod(conv.weight) + 2 * dy + zeros)


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


def test_stride_phases_pair_every_tap_once():
    """The stride phases of one axis (``common.axis_phases``) pair input indices, taps and
    grad-output indices exactly as the forward does, each pair once, over strides 1-4 with
    dilations sharing factors with them, even kernels, padding past the kernel's reach and
    input extents below the stride or not a multiple of it."""
    for k, s, p, d, n, right in itertools.product(range(1, 7), range(1, 5), range(8), range(1, 4),
                                                  (1, 2, 7, 9), (0, 3)):
        outs = (n + p + right - (k - 1) * d - 1) // s + 1
        if outs <= 0:
            continue
        want = sorted((o * s - p + t * d, t, o) for o in range(outs) for t in range(k)
                      if 0 <= o * s - p + t * d < n)
        phases = common.axis_phases(k, s, p, d, n)
        assert [ph.first for ph in phases] == list(range(min(s, n)))
        got = [(q * s + ph.first, ph.tap + (ph.taps - 1 - u) * ph.step, q - ph.pad + u * ph.dil)
               for ph in phases for q in range(len(range(ph.first, n, s)))
               for u in range(ph.taps) if 0 <= q - ph.pad + u * ph.dil < outs]
        assert sorted(got) == want, (k, s, p, d, n, right)


PHASE_CASES = [  # (input, weight, groups, stride, padding (6), dilation)
    # stride 3 with dilation 2 along D, stride 2 with dilation 2 along H (gcd 2: the odd phase
    # gets no tap, zeros), stride 2 along W with an even kernel and padding past its reach;
    # 7 and 5 voxels: the last phases are shorter
    ((1, 16, 7, 6, 5), (16, 16, 3, 2, 4), 1, (3, 2, 2), (2, 0, 3, 1, 1, 0), (2, 2, 1)),
    # even kernels with the asymmetric padding "same" would take (left one less), groups; an
    # axis shorter than its stride
    ((2, 16, 5, 1, 6), (32, 8, 2, 1, 4), 2, (2, 2, 3), (0, 0, 1, 1, 0, 2), (1, 1, 1)),
]


@pytest.mark.parametrize("tma", [True, False], ids=["descriptors", "pointers"])
@pytest.mark.parametrize("case", PHASE_CASES, ids=["s3x2x2-d2x2x1", "s2x2x3-g2"])
def test_grad_input_stride_phases(case, tma, device, no_tf32):
    """Grad-input at stride > 1 through the launcher: one launch per stride phase with taps,
    each over its sub-kernel only, the phases no tap reaches zero-filled, against float64."""
    from lk3d.kernels import implicit_gemm

    x_shape, w_shape, groups, stride, pad, dil = case
    g = torch.Generator().manual_seed(6)
    x = torch.randn(x_shape, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(w_shape, dtype=torch.float64, generator=g)
    y = F.conv3d(F.pad(x, (pad[2], pad[5], pad[1], pad[4], pad[0], pad[3])), w, stride=stride,
                 dilation=dil, groups=groups)
    gy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    want = torch.autograd.grad(y, x, gy)[0]
    config = dict(BLOCK_H=4, BLOCK_W=4, BLOCK_N=16, BLOCK_K=16)
    with launch_record.interpreted_compile_keys() as keys:
        got = implicit_gemm.conv3d_desc_bwd_input(
            gy.to(dtype=torch.float32, device=device), w.to(dtype=torch.float32, device=device),
            x.shape, stride, pad, dil, groups, config, tma=tma)
    assert got.shape == x.shape and rel_err(got, want) < TOL[torch.float32]
    phases = [p for p in common.grad_input_phases(w_shape[2:], stride, pad, dil, x_shape[2:])
              if all(a.taps for a in p)]
    if device.type == "cpu":
        assert len(keys) == len(phases) < math.prod(stride)
        taps = sorted(int(k["constexprs"]["KD"]) * int(k["constexprs"]["KH"])
                      * int(k["constexprs"]["KW"]) for k in keys)
        assert taps == sorted(math.prod(a.taps for a in p) for p in phases)
        assert sum(taps) <= math.prod(w_shape[2:])


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
    dy = torch.randn(1, 8, 2, 2, 2, device=device)  # grad-input reduces over Cout/g = 8
    with raises_naming(ValueError, ["grad_output", "16", "got 8 channels"]):
        implicit_gemm.conv3d_desc_bwd_input(dy, torch.randn(8, 16, 1, 1, 1, device=device),
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
