"""The block-sparse kernel on the tensor-descriptor loader (lk3d.kernels.block_sparse_desc): forward
and grad-input through its launchers, both operand paths (descriptors, pointers), against float64
``F.conv3d`` with the dense weight the stored blocks stand for; and the routing that sends
problems to it or to lk3d.kernels.block_sparse.

Block patterns are random with one empty and one fully stored block row. Under the interpreter
fp32 (IEEE) and fp16 ``tl.dot`` are checked; bf16 is compiled ahead of time (tests/test_aot.py).
"""
import pytest
import torch
import torch.nn.functional as F

from _cases import TOL, rel_err
from lk3d import _block_sparse_launch as launch
from lk3d.autotune import devices
from lk3d.kernels import block_sparse_desc as bsd
from lk3d.kernels import common
from test_block_sparse_kernel import _grid, from_mask, stored_blocks


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(common, "POISON", True)


def _pattern(w, block, density, g):
    """(values, row_ptr, col, masked dense weight): a random ``density`` of the blocks, block
    row 0 empty and the last block row fully stored."""
    no, ni, nd, nh, nw = _grid(w.shape, block)
    mask = torch.rand(no, ni * nd * nh * nw, generator=g) < density
    mask[0] = False
    mask[-1] = True
    return from_mask(w, block, mask)


def _reference(x, w, b, stride, padding, dilation, groups, gy):
    p = padding
    xr = x.clone().requires_grad_()
    y = F.conv3d(F.pad(xr, (p[2], p[5], p[1], p[4], p[0], p[3])), w, b, stride, 0, dilation,
                 groups)
    y.backward(gy)
    return y, xr.grad


# (id, arguments): odd sizes, 16-channel blocks, tap bricks, even kernels with 'same' padding
# (asymmetric), dilation, groups, stride along D.
CASES = [
    ("b16x16-k3-same", dict(N=1, cin=32, cout=48, size=(3, 5, 7), kernel=(3, 3, 3),
                            block=(16, 16, 1, 1, 1), padding=(1,) * 6)),
    ("b16x32-k2x4x3-same-even", dict(N=2, cin=32, cout=32, size=(4, 3, 5), kernel=(2, 4, 3),
                                     block=(16, 32, 1, 2, 1), padding=(0, 1, 1, 1, 2, 1))),
    ("b32x16-dil2-groups2-brick", dict(N=1, cin=64, cout=64, size=(5, 6, 3), kernel=(2, 3, 2),
                                       block=(32, 16, 2, 1, 2), padding=(1, 2, 1, 1, 2, 1),
                                       dilation=(2, 2, 1), groups=2)),
]


def _tensors(N, cin, cout, size, kernel, block, groups=1, seed=0, **_):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, cin, *size, generator=g, dtype=torch.float64)
    w = torch.randn(cout, cin // groups, *kernel, generator=g, dtype=torch.float64)
    b = torch.randn(cout, generator=g, dtype=torch.float64)
    return x, w, b, *_pattern(w, block, 0.4, g), g


@pytest.mark.parametrize("tma", [True, False], ids=["descriptors", "pointers"])
@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[i for i, _ in CASES])
def test_forward_grad_input(case, tma, device, no_tf32):
    """fp32 (IEEE) forward with bias, and grad-input at stride 1, from a non-contiguous input,
    grad_output and values; nothing passed is changed."""
    x, w, b, values, row_ptr, col, wd, g = _tensors(**case)
    stride, pad = (1, 1, 1), case["padding"]
    dil, groups = case.get("dilation", (1, 1, 1)), case.get("groups", 1)
    y_ref = F.conv3d(F.pad(x, (pad[2], pad[5], pad[1], pad[4], pad[0], pad[3])), wd, b, stride,
                     0, dil, groups)
    gy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    y_ref, dx_ref = _reference(x, wd, b, stride, pad, dil, groups, gy)
    f32 = dict(dtype=torch.float32, device=device)
    xk = x.to(**f32).transpose(3, 4).contiguous().transpose(3, 4)  # non-contiguous
    gyk = gy.to(**f32).transpose(2, 3).contiguous().transpose(2, 3)
    vk = values.to(**f32).transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous
    vk_before, xk_before = vk.clone(), xk.clone()
    config = dict(BLOCK_H=4, BLOCK_W=8, PAIR=tma)  # two stacked bricks a program, or one
    args = (row_ptr.to(device), col.to(device), w.shape, case["block"])
    y = bsd.block_sparse_desc_fwd(xk, vk, *args, b.to(**f32), stride, pad, dil, groups, config,
                                  tma=tma)
    dx = bsd.block_sparse_desc_bwd_input(gyk, vk, *args, x.shape, stride, pad, dil, groups,
                                         config, tma=tma)
    assert torch.equal(vk, vk_before) and torch.equal(xk, xk_before)
    assert rel_err(y, y_ref) < TOL[torch.float32]
    assert rel_err(dx, dx_ref) < TOL[torch.float32]


def _launch_record(monkeypatch, module, name):
    """Which launcher of ``module`` ran: wraps ``name`` to count its calls."""
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or real(*a, **k))
    return calls


def test_routing_and_every_shipped_config(device, monkeypatch, no_tf32):
    """lk3d._block_sparse_launch sends the forward, stride-1 grad-input and grad-values of
    16-channel blocks to the descriptor kernels (each shipped config once, and the default
    without one), and
    what it does not take (8-channel blocks; grad-input at stride 2) to
    lk3d.kernels.block_sparse; fp32 results match float64."""
    from lk3d.kernels import block_sparse as bs
    from lk3d.kernels import block_sparse_configs as bsc

    case = dict(N=1, cin=32, cout=32, size=(3, 4, 5), kernel=(3, 2, 3), block=(16, 16, 1, 1, 1),
                padding=(1, 0, 1, 1, 1, 1))
    x, w, b, values, row_ptr, col, wd, g = _tensors(**case)
    geo = ((1, 1, 1), case["padding"], (1, 1, 1), 1)
    y_ref = F.conv3d(F.pad(x, (1, 1, 0, 1, 1, 1)), wd, b)
    gy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    y_ref, dx_ref = _reference(x, wd, b, *geo, gy)
    f32 = dict(dtype=torch.float32, device=device)
    xk, vk, bk, gyk = x.to(**f32), values.to(**f32), b.to(**f32), gy.to(**f32)
    fwd = _launch_record(monkeypatch, bsd, "block_sparse_desc_fwd")
    bwd = _launch_record(monkeypatch, bsd, "block_sparse_desc_bwd_input")
    for config in [None, *bsc.BLOCK_SPARSE_DESC_CONFIGS]:
        y = launch.block_sparse_fwd(xk, vk, row_ptr, col, w.shape, case["block"], bk, *geo,
                                    config=config)
        dx = launch.block_sparse_bwd_input(gyk, vk, row_ptr, col, w.shape, case["block"],
                                           x.shape, *geo, config=config)
        assert rel_err(y, y_ref) < TOL[torch.float32], config
        assert rel_err(dx, dx_ref) < TOL[torch.float32], config
    assert len(fwd) == len(bwd) == 1 + len(bsc.BLOCK_SPARSE_DESC_CONFIGS)
    wgrad = _launch_record(monkeypatch, bsd, "block_sparse_desc_bwd_values")
    xr, wr = x.clone(), wd.clone().requires_grad_()
    F.conv3d(F.pad(xr, (1, 1, 0, 1, 1, 1)), wr).backward(gy)
    want = stored_blocks(wr.grad, case["block"], row_ptr, col)
    for config in [None, *bsc.BLOCK_SPARSE_DESC_WGRAD_CONFIGS]:
        config = config and dict(config, SPLIT=2)
        dv = launch.block_sparse_bwd_values(gyk, xk, vk, row_ptr, col, w.shape, case["block"],
                                            *geo, config=config)
        assert rel_err(dv, want) < TOL[torch.float32], config
    assert len(wgrad) == 1 + len(bsc.BLOCK_SPARSE_DESC_WGRAD_CONFIGS)
    old = _launch_record(monkeypatch, bs, "block_sparse_bwd_input")
    launch.block_sparse_bwd_input(gyk, vk, row_ptr, col, w.shape, case["block"],
                                  (1, 32, 3, 4, 9), (1, 1, 2), case["padding"], (1, 1, 1), 1)
    assert old == ["block_sparse_bwd_input"] and len(bwd) == 1 + len(bsc.BLOCK_SPARSE_DESC_CONFIGS)
    assert not bsc.descriptor_fits(torch.float32, (32, 32, 3, 3, 3), (8, 16, 1, 1, 1), (1, 1, 1),
                                   32)
    assert not bsc.descriptor_fits(torch.float64, w.shape, case["block"], (1, 1, 1), 32)


def test_empty_index_and_rows(device, no_tf32):
    """No stored block at all: the forward writes the bias, grad-input zeros."""
    x = torch.randn(1, 16, 3, 4, 5, device=device)
    values = torch.zeros(0, 16, 16, 1, 1, 1, device=device)
    row_ptr = torch.zeros(3, dtype=torch.int32, device=device)
    col = torch.zeros(0, dtype=torch.int32, device=device)
    b = torch.randn(32, device=device)
    geo = ((1, 1, 1), (1,) * 6, (1, 1, 1), 1)
    config = dict(BLOCK_H=8, BLOCK_W=8, PAIR=False)
    y = bsd.block_sparse_desc_fwd(x, values, row_ptr, col, (32, 16, 3, 3, 3), (16, 16, 1, 1, 1),
                                  b, *geo, config)
    assert torch.equal(y.cpu(), b.cpu()[None, :, None, None, None].expand(1, 32, 3, 4, 5))
    dx = bsd.block_sparse_desc_bwd_input(torch.randn(1, 32, 3, 4, 5, device=device), values,
                                         row_ptr, col, (32, 16, 3, 3, 3), (16, 16, 1, 1, 1),
                                         x.shape, *geo, config)
    assert torch.equal(dx.cpu(), torch.zeros(1, 16, 3, 4, 5))


def test_cuda_model_prices_the_descriptor_kernel():
    """On an H100's figures the descriptor passes are priced at their own ceiling and executed
    FLOPs: about proportional to the stored blocks (the copies aside), below lk3d's dense
    descriptor kernel on the dense weight at half density, and far below the gather kernel's
    pricing (the dense gather model over its step efficiency)."""
    from lk3d import _algos

    class CudaStandIn:
        def __init__(self, shape):
            self.shape, self.dtype = torch.Size(shape), torch.bfloat16
            self.device = torch.device("cuda")

    gpu = devices.named("h100")
    x = CudaStandIn((1, 64, 32, 32, 32))
    w = [64, 64, 15, 15, 15]
    blocks = 4 * 4 * 15 ** 3
    geo = ([1, 1, 1], [7] * 6, [1, 1, 1])
    dense = _algos.model_ms("tiled", list(x.shape), w, *geo, 1, torch.bfloat16, gpu)
    for pass_ in ("forward", "grad_input"):
        ms = {d: launch.kernels_ms(pass_, x, round(d * blocks), w, (16, 16, 1, 1, 1), *geo, 1,
                                   device=gpu) for d in (0.1, 0.5, 1.0)}
        assert 4 < ms[0.5] / ms[0.1] < 5.5 and 1.8 < ms[1.0] / ms[0.5] < 2.1, ms
        assert ms[0.5] < dense, (dense, ms)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(launch, "descriptor", lambda *args: False)
            gather = launch.kernels_ms(pass_, x, round(0.1 * blocks), w, (16, 16, 1, 1, 1),
                                       *geo, 1, device=gpu)
        assert gather > 4 * ms[0.1], (gather, ms)


@pytest.mark.parametrize("tma", [True, False], ids=["descriptors", "pointers"])
def test_grad_values(tma, device, no_tf32):
    """fp32 grad-values against the stored blocks of float64 autograd's weight gradient: stride
    2 along D, even kernel with 'same' padding, dilation, groups, a tap brick; the reduction
    split over 3 programs; non-contiguous input and grad_output."""
    case = dict(N=2, cin=32, cout=32, size=(5, 3, 6), kernel=(2, 3, 2), block=(16, 16, 2, 1, 1),
                groups=2)
    x, w, b, values, row_ptr, col, wd, g = _tensors(**case)
    stride, pad, dil = (2, 1, 1), (0, 1, 1, 1, 1, 0), (1, 2, 1)
    xr, wr = x.clone(), wd.clone().requires_grad_()
    y = F.conv3d(F.pad(xr, (pad[2], pad[5], pad[1], pad[4], pad[0], pad[3])), wr, None, stride,
                 0, dil, 2)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(gy)
    want = stored_blocks(wr.grad, case["block"], row_ptr, col)
    f32 = dict(dtype=torch.float32, device=device)
    xk = x.to(**f32).transpose(3, 4).contiguous().transpose(3, 4)
    gyk = gy.to(**f32).transpose(2, 3).contiguous().transpose(2, 3)
    dv = bsd.block_sparse_desc_bwd_values(gyk, xk, values.to(**f32), row_ptr.to(device),
                                          col.to(device), w.shape, case["block"], stride, pad,
                                          dil, 2, dict(BLOCK_H=2, BLOCK_W=8, SPLIT=3), tma=tma)
    assert dv.shape == values.shape and dv.dtype == torch.float32
    assert rel_err(dv, want) < TOL[torch.float32]
