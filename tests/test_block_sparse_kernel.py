"""The block-sparse conv3d kernels (lk3d.kernels.block_sparse), called through their launchers.

The block index is built here from a random dense weight and a random block mask; the reference is
float64 ``F.conv3d`` with the masked dense weight (forward), its autograd grad-input, and the stored
blocks of its autograd weight gradient (grad-values). Every launcher buffer starts NaN-poisoned.
A launch without a config of its own takes the default (``lk3d._block_sparse_launch``).
"""
import pytest
import torch
import torch.nn.functional as F

from _cases import TOL, rel_err
from lk3d import _block_sparse_launch as launch
from lk3d.autotune.configs import Problem, default_config
from lk3d.kernels import block_sparse as bs
from lk3d.kernels import block_sparse_configs as bsc
from lk3d.kernels import common


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(common, "POISON", True)


def _grid(weight_shape, block):
    return tuple(w // b for w, b in zip(weight_shape, block))


def _split_blocks(w, block):
    """[NO, NI*ND*NH*NW, bo, bi, bd, bh, bw] view of a dense weight, in ``col`` order."""
    no, ni, nd, nh, nw = _grid(w.shape, block)
    bo, bi, bd, bh, bw = block
    b = w.reshape(no, bo, ni, bi, nd, bd, nh, bh, nw, bw).permute(0, 2, 4, 6, 8, 1, 3, 5, 7, 9)
    return b.reshape(no, ni * nd * nh * nw, *block)


def to_block_sparse(w, block, density, seed=0):
    """(values, row_ptr, col, masked dense weight) keeping a random ``density`` of the blocks."""
    no, ni, nd, nh, nw = _grid(w.shape, block)
    g = torch.Generator().manual_seed(seed)
    return from_mask(w, block, torch.rand(no, ni * nd * nh * nw, generator=g) < density)


def from_mask(w, block, mask):
    """(values, row_ptr, col, masked dense weight) of the blocks of ``w`` that ``mask`` [block
    rows, block columns] marks."""
    no, ni, nd, nh, nw = _grid(w.shape, block)
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: col ascending within each row
    row_ptr = torch.zeros(no + 1, dtype=torch.int32)
    row_ptr[1:] = mask.sum(1).cumsum(0)
    values = _split_blocks(w, block)[rows, cols].contiguous()
    bo, bi, bd, bh, bw = block
    dense_mask = (mask.reshape(no, 1, ni, 1, nd, 1, nh, 1, nw, 1)
                  .expand(no, bo, ni, bi, nd, bd, nh, bh, nw, bw).reshape(w.shape))
    return values, row_ptr, cols.to(torch.int32), w * dense_mask


def stored_blocks(dense, block, row_ptr, col):
    """The blocks of a dense [Cout, Cin/g, kd, kh, kw] tensor at the stored positions."""
    rows = torch.repeat_interleave(torch.arange(row_ptr.numel() - 1),
                                   (row_ptr[1:] - row_ptr[:-1]).long())
    return _split_blocks(dense, block)[rows, col.long()]


def _pad6(padding):
    return tuple(padding) if len(padding) == 6 else tuple(padding) * 2


def run(N, cin, cout, size, kernel, block, density, *, stride=(1, 1, 1), padding=(0, 0, 0),
        dilation=(1, 1, 1), groups=1, bias=True, dtype=torch.float64, layout="contiguous",
        device="cpu", configs=(None, None, None), seed=0):
    """All three launchers on one problem; the relative errors against the float64 reference."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, cin, *size, generator=g, dtype=torch.float64).to(dtype).double()
    w = torch.randn(cout, cin // groups, *kernel, generator=g, dtype=torch.float64)
    w = w.to(dtype).double()
    b = torch.randn(cout, generator=g, dtype=torch.float64).to(dtype).double() if bias else None
    values, row_ptr, col, wd = to_block_sparse(w, block, density, seed)
    p = _pad6(padding)

    xr, wr = x.clone().requires_grad_(), wd.clone().requires_grad_()
    ref = F.conv3d(F.pad(xr, (p[2], p[5], p[1], p[4], p[0], p[3])), wr, b, stride, 0, dilation,
                   groups)
    gy = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(dtype).double()
    ref.backward(gy)

    to = dict(device=device, dtype=dtype)
    xk = x.to(**to)
    if layout == "channels_last_3d":
        xk = xk.contiguous(memory_format=torch.channels_last_3d)
    gyk = gy.to(**to)
    if layout == "channels_last_3d":
        gyk = gyk.contiguous(memory_format=torch.channels_last_3d)
    vk, rk, ck = values.to(**to), row_ptr.to(device), col.to(device)
    bk = None if b is None else b.to(**to)
    args = (stride, p, dilation, groups)
    y = launch.block_sparse_fwd(xk, vk, rk, ck, w.shape, block, bk, *args, config=configs[0])
    dx = launch.block_sparse_bwd_input(gyk, vk, rk, ck, w.shape, block, x.shape, *args,
                                       config=configs[1])
    dv = launch.block_sparse_bwd_values(gyk, xk, vk, rk, ck, w.shape, block, *args,
                                        config=configs[2])
    if layout == "channels_last_3d":
        assert y.is_contiguous(memory_format=torch.channels_last_3d)
        assert dx.is_contiguous(memory_format=torch.channels_last_3d)
    assert y.dtype == dx.dtype == dv.dtype == dtype
    want_dv = stored_blocks(wr.grad, block, row_ptr, col)
    assert dv.shape == want_dv.shape == values.shape
    return rel_err(y, ref), rel_err(dx, xr.grad), rel_err(dv, want_dv) if values.numel() else 0.0


# (id, arguments of ``run``): odd/prime sizes, channel blocks and tap bricks, every geometry knob.
CASES = [
    ("dense-b2x2-d0.3", dict(N=2, cin=4, cout=6, size=(5, 7, 3), kernel=(3, 3, 3),
                             block=(2, 2, 1, 1, 1), density=0.3, padding=(1, 1, 1))),
    ("dense-b3x2-all", dict(N=1, cin=4, cout=6, size=(5, 3, 7), kernel=(3, 1, 3),
                            block=(3, 2, 1, 1, 1), density=1.0, padding=(1, 0, 1))),
    ("dense-none", dict(N=1, cin=4, cout=4, size=(3, 5, 3), kernel=(3, 3, 3),
                        block=(2, 2, 1, 1, 1), density=0.0, padding=(1, 1, 1))),
    ("brick-b2x2x3x2x2-k3x2x4", dict(N=1, cin=4, cout=4, size=(5, 6, 7), kernel=(3, 2, 4),
                                     block=(2, 2, 3, 2, 2), density=0.5, bias=False)),
    ("s2-d2-asym-pad", dict(N=2, cin=3, cout=4, size=(7, 6, 9), kernel=(2, 3, 5),
                            block=(2, 3, 1, 3, 1), density=0.5, stride=(2, 1, 2),
                            padding=(1, 0, 2, 2, 1, 0), dilation=(1, 2, 1))),
    ("groups2-b2x3", dict(N=1, cin=6, cout=4, size=(5, 5, 4), kernel=(3, 3, 2),
                          block=(2, 3, 1, 1, 2), density=0.6, stride=(1, 2, 1),
                          padding=(1, 1, 0), groups=2)),
    ("dw-mult2-b3-unaligned", dict(N=2, cin=3, cout=6, size=(5, 7, 6), kernel=(3, 3, 3),
                                   block=(3, 1, 1, 3, 1), density=0.5, padding=(1, 1, 1),
                                   groups=3)),
    ("dw-brick-s2-d2", dict(N=1, cin=4, cout=4, size=(9, 7, 8), kernel=(4, 2, 2),
                            block=(2, 1, 2, 2, 2), density=0.7, stride=(2, 2, 1),
                            padding=(3, 1, 0, 2, 0, 1), dilation=(2, 1, 2), groups=4)),
    ("dw-none", dict(N=1, cin=2, cout=4, size=(4, 5, 3), kernel=(3, 3, 3), block=(2, 1, 3, 1, 1),
                     density=0.0, padding=(1, 1, 1), groups=2)),
    ("dw-all-single-input", dict(N=1, cin=1, cout=2, size=(5, 4, 6), kernel=(3, 3, 3),
                                 block=(1, 1, 3, 1, 3), density=1.0, padding=(1, 1, 1))),
]


@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[i for i, _ in CASES])
def test_float64(case, device):
    errs = run(**case, device=device)
    assert max(errs) < TOL[torch.float64], errs


@pytest.mark.parametrize("case", [CASES[0][1], CASES[6][1]], ids=["dense", "depthwise"])
def test_channels_last_3d(case, device):
    errs = run(**case, layout="channels_last_3d", device=device)
    assert max(errs) < TOL[torch.float64], errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_low_precision_dot(dtype, device, no_tf32):
    """fp32 (ieee) and fp16 through tl.dot, fp32 accumulation (bf16 tl.dot is wrong in the
    interpreter: it is compiled ahead of time instead, tests/test_aot.py)."""
    errs = run(**CASES[4][1], dtype=dtype, device=device)
    assert max(errs) < TOL[dtype], errs


def test_empty_rows_store_bias_only(device):
    """A block row without stored blocks still writes its outputs: the bias, or zero."""
    x = torch.randn(1, 4, 3, 4, 5, dtype=torch.float64, device=device)
    values = torch.zeros(0, 2, 2, 1, 1, 1, dtype=torch.float64, device=device)
    row_ptr = torch.zeros(3, dtype=torch.int32, device=device)
    col = torch.zeros(0, dtype=torch.int32, device=device)
    b = torch.tensor([1.5, -2.0, 0.25, 3.0], dtype=torch.float64, device=device)
    y = launch.block_sparse_fwd(x, values, row_ptr, col, (4, 4, 3, 3, 3), (2, 2, 1, 1, 1), b,
                                (1, 1, 1), (1,) * 6, (1, 1, 1), 1)
    assert torch.equal(y.cpu(), b.cpu()[None, :, None, None, None].expand(1, 4, 3, 4, 5))


def test_transpose_index():
    """The CSC view: per global input-channel block column, its blocks and rows, in row order."""
    # Cout=4, Cin/g=4, groups=2, kernel 1x1x2, blocks (2, 2, 1, 1, 1): NI=2, taps=2 -> 4 cols/row.
    row_ptr = torch.tensor([0, 3, 5], dtype=torch.int32)
    col = torch.tensor([0, 2, 3, 1, 2], dtype=torch.int32)  # row 0: ci 0,1,1; row 1: ci 0,1
    ptr, blk, row = bs.transpose_index(row_ptr, col, (4, 4, 1, 1, 2), (2, 2, 1, 1, 1), 2)
    # Row 0 is group 0 (columns 0, 1), row 1 group 1 (columns 2, 3).
    assert ptr.tolist() == [0, 1, 3, 4, 5]
    assert blk.tolist() == [0, 1, 2, 3, 4]
    assert row.tolist() == [0, 0, 0, 1, 1]
    ptr, blk, row = bs.transpose_index(row_ptr, col, (4, 4, 1, 1, 2), (2, 2, 1, 1, 1), 1)
    assert ptr.tolist() == [0, 2, 5]
    assert blk.tolist() == [0, 3, 1, 2, 4]
    assert row.tolist() == [0, 1, 0, 0, 1]
    assert ptr.dtype == blk.dtype == row.dtype == torch.int32


# Every shipped config, once, on a tiny problem of the path that takes it; grad-values split
# over several programs.
_DENSE = dict(CASES[4][1], N=1, size=(5, 6, 7))
_DW = CASES[6][1]


def _config_cases():
    for kind, space in bsc.CONFIG_SPACES.items():
        if kind == "block_sparse_desc":  # tests/test_block_sparse_desc.py
            continue
        for config in space:
            cid = f"{kind}-" + "-".join(f"{k}{v}" for k, v in config.items())
            if kind == "block_sparse_fwd":
                yield cid, _DENSE, (config, config, None)
            elif kind == "block_sparse_dw":
                yield cid, _DW, (config, config, None)
            elif kind == "block_sparse_wgrad":
                yield cid, _DENSE, (None, None, dict(config, SPLIT=3))
            else:
                yield cid, _DW, (None, None, dict(config, SPLIT=3))


@pytest.mark.parametrize("case,configs", [c[1:] for c in _config_cases()],
                         ids=[c[0] for c in _config_cases()])
def test_shipped_config(case, configs, device):
    errs = run(**case, configs=configs, device=device)
    assert max(errs) < TOL[torch.float64], errs


def test_default_config_fits_shared_memory():
    """On a GPU the pick stays within shared memory, dropping stages for wide fp32 blocks."""
    limit = 99 * 1024
    for block in [(16, 16, 1, 1, 1), (64, 64, 1, 1, 1), (128, 128, 1, 1, 1)]:
        p = Problem("block_sparse_fwd", M=10**6, block_shape=block)
        for elem in (2, 4):
            c = bsc.pick(p, limit, elem)
            assert c["num_stages"] >= 1
            if bsc.shared_bytes(dict(c, num_stages=1), p, elem) <= limit:
                assert bsc.shared_bytes(c, p, elem) <= limit
    p = Problem("block_sparse_fwd", M=10**6, block_shape=(16, 16, 1, 1, 1))
    assert bsc.pick(p, limit, 2)["BLOCK_M"] == 128
    c = default_config(Problem("block_sparse_wgrad", M=500, block_shape=(4, 4, 1, 1, 1),
                               programs=8), "cpu", 4)
    assert c == dict(BLOCK_S=512, SPLIT=1)
