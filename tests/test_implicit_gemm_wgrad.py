"""The tensor-descriptor grad-weight (``lk3d.kernels.implicit_gemm.conv3d_desc_wgrad_kernel``)
against float64: through its launcher, with descriptors (TMA on sm_90) and with pointers (sm_80),
and through ``lk3d.conv3d``, which routes dense and grouped grad-weights with Cin/g and Cout/g
multiples of 16 at stride 1 along H and W to it. Every buffer a launcher allocates starts as
NaN."""
import pytest
import torch
import torch.nn.functional as F

import lk3d
from _cases import TOL, raises_naming, rel_err, strided_copy
from lk3d._algos import descriptor_gemm, tiled_configs, tiled_problem
from lk3d.kernels import common, implicit_gemm_configs
from lk3d.tools import launch_record


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(common, "POISON", True)


def _wgrad_ref(x, dy, w_shape, stride, padding, dilation, groups):
    """float64 grad-weight: aten's on the explicitly zero-padded input."""
    p = padding
    xp = F.pad(x.double().cpu(), (p[2], p[5], p[1], p[4], p[0], p[3]))
    return torch.ops.aten.convolution_backward(
        dy.double().cpu(), xp, torch.empty(w_shape, dtype=torch.float64), None, stride,
        [0, 0, 0], dilation, False, [0, 0, 0], groups, [False, True, False])[1]


def _operands(n, cin, size, cout, out_size, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, *size, dtype=torch.float64, generator=g)
    dy = torch.randn(n, cout, *out_size, dtype=torch.float64, generator=g)
    return x, dy, x.to(dtype=dtype, device=device), dy.to(dtype=dtype, device=device)


# (N, Cin, size, Cout, kernel, stride, padding (six ints), dilation, groups, config)
LAUNCHES = [
    # "same" at an odd kernel; a ragged brick (5 x 7 in 4 x 8); kw = 3 in strips of 2 taps (the
    # last strip's second tap computed, not stored); the bricks shared by 3 programs
    (2, 16, (3, 5, 7), 32, (3, 3, 3), (1, 1, 1), (1, 1, 1, 1, 1, 1), (1, 1, 1), 1,
     dict(BLOCK_H=4, BLOCK_W=8, BLOCK_CO=16, BLOCK_CI=16, TAPS=2, SPLIT=3)),
    # "same" at even kernel sides (left 0, right 1), dilation along H, groups
    (1, 32, (4, 5, 9), 32, (2, 3, 2), (1, 1, 1), (0, 2, 0, 1, 2, 1), (1, 2, 1), 2,
     dict(BLOCK_H=4, BLOCK_W=8, BLOCK_CO=16, BLOCK_CI=16, TAPS=4, SPLIT=1)),
    # stride and dilation along D, padding past the kernel's reach along W
    (1, 16, (7, 3, 4), 16, (3, 1, 3), (2, 1, 1), (1, 0, 3, 1, 0, 3), (2, 1, 1), 1,
     dict(BLOCK_H=4, BLOCK_W=8, BLOCK_CO=16, BLOCK_CI=16, TAPS=8, SPLIT=2)),
]


@pytest.mark.parametrize("tma", [True, False], ids=["descriptors", "pointers"])
@pytest.mark.parametrize("i", range(len(LAUNCHES)))
def test_launcher(i, tma, device, no_tf32):
    """Geometries through the launcher, fp32 (fp16 for the strided case), on non-contiguous
    operands: the result against float64, in the weight's shape and the input's dtype, and the
    operands unchanged."""
    from lk3d.kernels import implicit_gemm, out_size

    n, cin, size, cout, kernel, stride, pad, dil, groups, config = LAUNCHES[i]
    dtype = torch.float16 if i == 2 else torch.float32
    w_shape = (cout, cin // groups, *kernel)
    osize = out_size(size, kernel, stride, pad, dil)
    x, dy, xk, dyk = _operands(n, cin, size, cout, osize, dtype, device, i)
    xk = strided_copy(xk)
    dyk = dyk.transpose(2, 4).contiguous().transpose(2, 4) if i else strided_copy(dyk)
    before = xk.clone(), dyk.clone()
    got = implicit_gemm.conv3d_desc_bwd_weight(xk, dyk, w_shape, stride, pad, dil, groups, config,
                                               tma=tma)
    assert got.shape == w_shape and got.dtype == dtype and got.is_contiguous()
    assert rel_err(got, _wgrad_ref(x, dy, w_shape, stride, pad, dil, groups)) < TOL[dtype]
    assert torch.equal(xk, before[0]) and torch.equal(dyk, before[1])


@pytest.mark.parametrize("tma", [True, False], ids=["descriptors", "pointers"])
@pytest.mark.parametrize("config", implicit_gemm_configs.CONV3D_DESC_WGRAD_CONFIGS,
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_shipped_configs(config, tma, device, no_tf32):
    """Every shipped config, 64 -> 64 channels, fp32, its bricks split over 2 programs."""
    from lk3d.kernels import implicit_gemm

    geo = ((1, 1, 1), (1, 0, 1, 1, 0, 1), (1, 1, 1))
    x, dy, xk, dyk = _operands(1, 64, (2, 3, 5), 64, (2, 3, 5), torch.float32, device, 7)
    got = implicit_gemm.conv3d_desc_bwd_weight(xk, dyk, (64, 64, 3, 1, 3), *geo, 1,
                                               dict(config, SPLIT=2), tma=tma)
    assert rel_err(got, _wgrad_ref(x, dy, (64, 64, 3, 1, 3), *geo, 1)) < TOL[torch.float32]


def test_through_conv3d(device, no_tf32):
    """``lk3d.conv3d``'s grad-weight on the descriptor kernel (stride along D, "same"-style
    asymmetric padding) against float64; grad-input takes the gather kernel at that stride."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 5, 4, 6, dtype=torch.float64, generator=g)
    w = torch.randn(32, 16, 2, 3, 2, dtype=torch.float64, generator=g)
    args = dict(stride=(2, 1, 1), padding=(1, 1, 0))
    xk, wk = (t.to(dtype=torch.float32, device=device).requires_grad_() for t in (x, w))
    with launch_record.interpreted_compile_keys() as keys:
        y = lk3d.conv3d(xk, wk, None, **args)
        gy = torch.randn(y.shape, dtype=torch.float64, generator=g)
        gw = torch.autograd.grad(y, wk, gy.to(y))[0]
    if device.type == "cpu":
        assert "conv3d_desc_wgrad_kernel" in [k["kernel"] for k in keys]
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = torch.autograd.grad(F.conv3d(xr, wr, None, **args), wr, gy)[0]
    assert rel_err(gw, want) < TOL[torch.float32]


def test_nonfinite_placement(device, no_tf32):
    """NaN/Inf in the grad-weight where F.conv3d puts them: an Inf input voxel and an Inf in
    grad_output (whose taps that meet the zero padding add nothing in aten, 0·Inf here), so
    non-finite operands take aten's grad-weight."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 16, 3, 4, 5, dtype=torch.float64, generator=g)
    w = torch.randn(16, 16, 3, 3, 3, dtype=torch.float64, generator=g)
    x[0, 2, 1, 0, 4] = float("inf")
    gy = torch.randn(1, 16, 3, 4, 5, dtype=torch.float64, generator=g)
    gy[0, 5, 0, 3, 0] = float("inf")
    xk, wk = (t.to(dtype=torch.float32, device=device).requires_grad_() for t in (x, w))
    gw = torch.autograd.grad(lk3d.conv3d(xk, wk, None, padding=1), wk, gy.to(xk))[0]
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = torch.autograd.grad(F.conv3d(xr, wr, None, padding=1), wr, gy)[0]
    got = gw.double().cpu()
    assert want.isnan().any() and want.isinf().any()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    fin = want.isfinite()
    assert rel_err(got[fin], want[fin]) < TOL[torch.float32]


def test_routes():
    """What takes the descriptor grad-weight (operands by arch, the gather kernel the fallback
    variant, the NCDHW operands' copies counted), what stays on the gather kernel."""
    from lk3d import _algos

    def kernels(conv, arch=90):
        return [ln.name for ln in launch_record.launches(conv, "grad_weight", arch)[2]]

    g3 = launch_record.Conv((1, 64, 9, 9, 9), (64, 64, 7, 7, 7), padding="same")
    for arch in (90, 80):
        variant, config, launched = launch_record.launches(g3, "grad_weight", arch)
        assert variant == "descriptor" and [ln.name for ln in launched] == [
            "conv3d_desc_wgrad_kernel"]
        assert launched[0].args["TMA"] == (arch >= 90) and config["SPLIT"] >= 1
        assert launch_record.kernel_kind(launched[0]) == "implicit_gemm_desc_wgrad"
        copied = 2 * 2 * (64 * 9 ** 3) * 2  # input and grad_output, bf16, read and written
        assert launched[0].copied == copied
        assert launch_record.executed_flops(launched[0]) >= launch_record.useful_flops(
            g3, "grad_weight")
        names = [(v, [ln.name for ln in lns]) for v, _, lns in
                 launch_record.variants(g3, "grad_weight", arch)]
        assert names == [("descriptor", ["conv3d_desc_wgrad_kernel"]),
                         ("gather", ["conv3d_wgrad_kernel"])]
    gather = ["conv3d_wgrad_kernel"]
    assert kernels(launch_record.Conv((1, 32, 9, 9, 9), (32, 32, 3, 3, 3),
                                      stride=(2, 1, 1))) == ["conv3d_desc_wgrad_kernel"]
    for conv in (launch_record.Conv((1, 32, 9, 9, 9), (32, 32, 3, 3, 3), stride=(1, 2, 1)),
                 launch_record.Conv((1, 32, 9, 9, 9), (24, 32, 3, 3, 3)),  # Cout/g 24
                 launch_record.Conv((1, 8, 9, 9, 9), (16, 8, 3, 3, 3)),    # Cin/g 8
                 launch_record.Conv((1, 32, 9, 9, 9), (32, 32, 3, 3, 3), dtype="fp32")):
        want = gather if conv.dtype != "fp32" else ["conv3d_desc_wgrad_kernel"]
        assert kernels(conv) == want
    op = "conv3d_grad_weight"
    assert descriptor_gemm(op, (1, 32, 4, 4, 4), (32, 16, 3, 3, 3), (1, 1, 1), 2, torch.float16)
    assert not descriptor_gemm(op, (1, 32, 4, 4, 4), (32, 16, 3, 3, 3), (1, 1, 1), 1,
                               torch.float64)
    cpu = torch.device("cpu")
    problem = tiled_problem(op, (1, 32, 4, 4, 4), (32, 32, 3, 3, 3), (1, 1, 1), (1,) * 6,
                            (1, 1, 1), 1, cpu, dtype=torch.float32)
    assert problem.kind == "conv3d_desc_wgrad" and (problem.KC, problem.NC) == (32, 32)
    assert "conv3d_desc_wgrad" in _algos.registry.get(op, "tiled").spaces


def test_config_choice():
    """The default config: the widest channel tile dividing Cin/g and Cout/g within the
    device's shared memory; the configs worth measuring are the ones whose blocks divide them."""
    from lk3d.autotune.configs import SMEM_LIMIT, Problem

    def pick(kc, nc, major=9, size=2):
        p = Problem("conv3d_desc_wgrad", M=10**6, KC=kc, NC=nc, taps=27, programs=1, partial=1)
        c = implicit_gemm_configs.pick(p, SMEM_LIMIT[major], size)
        return c["BLOCK_CO"], c["BLOCK_CI"], c["TAPS"]

    assert pick(64, 64) == pick(128, 64, major=8, size=4) == (64, 64, 2)
    assert pick(96, 32) == (32, 32, 4)
    assert pick(48, 64) == pick(16, 16) == (16, 16, 4)
    found = tiled_configs("conv3d_grad_weight", (1, 48, 9, 9, 9), (64, 48, 3, 3, 3), (1, 1, 1),
                          (1,) * 6, (1, 1, 1), 1, torch.float16, torch.device("cpu"))
    assert found and all(48 % c["BLOCK_CI"] == 0 and 64 % c["BLOCK_CO"] == 0 for c in found)


def test_launcher_errors(device):
    """The launcher refuses what the descriptors cannot serve, naming the argument, the
    expectation and the value given."""
    from lk3d.kernels import implicit_gemm

    config = dict(BLOCK_H=4, BLOCK_W=8, BLOCK_CO=16, BLOCK_CI=16, TAPS=2, SPLIT=1)
    geo = ((1, 1, 1), (0,) * 6, (1, 1, 1))
    x, dy = torch.randn(1, 8, 3, 3, 3, device=device), torch.randn(1, 16, 3, 3, 3, device=device)
    with raises_naming(ValueError, ["input", "16", "got 8 channels"]):
        implicit_gemm.conv3d_desc_bwd_weight(x, dy, (16, 8, 1, 1, 1), *geo, 1, config)
    x, dy = torch.randn(1, 16, 3, 3, 3, device=device), torch.randn(1, 24, 3, 3, 3, device=device)
    with raises_naming(ValueError, ["grad_output", "16", "got 24 channels"]):
        implicit_gemm.conv3d_desc_bwd_weight(x, dy, (24, 16, 1, 1, 1), *geo, 1, config)
    dy = torch.randn(1, 48, 3, 3, 3, device=device)
    with raises_naming(ValueError, ["config", "BLOCK_CO", "48", "got 32"]):
        implicit_gemm.conv3d_desc_bwd_weight(x, dy, (48, 16, 1, 1, 1), *geo, 1,
                                             dict(config, BLOCK_CO=32))
    with raises_naming(ValueError, ["input", "stride", "(1, 1, 2)"]):
        implicit_gemm.conv3d_desc_bwd_weight(x, dy, (48, 16, 1, 1, 1), (1, 1, 2), (0,) * 6,
                                             (1, 1, 1), 1, config)
    with raises_naming(TypeError, ["grad_output", "torch.float32", "torch.float16"]):
        implicit_gemm.conv3d_desc_bwd_weight(x, dy.half(), (48, 16, 1, 1, 1), *geo, 1, config)
    with raises_naming(ValueError, ["config", "TAPS"]):
        implicit_gemm.conv3d_desc_bwd_weight(x, dy, (48, 16, 1, 1, 1), *geo, 1,
                                             {k: v for k, v in config.items() if k != "TAPS"})
