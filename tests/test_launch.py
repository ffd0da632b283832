"""What a GPU would hit and the Triton interpreter hides, checked on the CPU.

* the TF32 choice read through torch's precision API (the legacy flag raises once a user set it);
* launch grids within CUDA's limits (65,535 programs along y and z): launches are recorded on
  ``meta`` tensors with every kernel swapped for a recorder;
* int64 voxel indices where a launch passes 2**31 voxels (the ``WIDE`` flag; the wide code path
  itself runs under the interpreter, and ``tests/test_aot.py`` compiles it for sm_80/sm_90);
* zero-size launches, and operands read through their strides (a non-contiguous bias, strided
  block-sparse index tensors).
"""
import dataclasses

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import lk3d  # noqa: E402
from _cases import TOL, conv3d_ref, rel_err, strided_copy  # noqa: E402
from conftest import DEVICE  # noqa: E402
from lk3d import _algos  # noqa: E402
from lk3d import block_sparse as bs_ops  # noqa: E402
from lk3d import cp as cp_ops  # noqa: E402
from lk3d.kernels import common, tiled  # noqa: E402
from lk3d.kernels import block_sparse as bs  # noqa: E402
from lk3d.kernels import cp as cpk  # noqa: E402
from test_block_sparse_kernel import stored_blocks  # noqa: E402

pytestmark = pytest.mark.skipif(not _algos.kernels_take(DEVICE, torch.float64),
                                reason=f"the Triton kernels do not take float64 on {DEVICE}")

GRID_YZ = 65535  # CUDA's limit on grid dimensions y and z
KERNELS = [(tiled, "conv3d_igemm_kernel"), (tiled, "conv3d_dw_kernel"),
           (tiled, "conv3d_wgrad_kernel"), (tiled, "conv3d_dw_wgrad_kernel"),
           (tiled, "bias_grad_kernel"), (cpk, "cp_conv_kernel"), (cpk, "cp_grad_kernel"),
           (bs, "bs_conv3d_kernel"), (bs, "bs_conv3d_wgrad_kernel")]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(common, "POISON", True)


@pytest.fixture
def launches(monkeypatch):
    """Every kernel swapped for a recorder: the list of (kernel name, grid, keyword arguments)."""
    recorded = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: recorded.append((self.name, tuple(grid), kwargs))

    for module, name in KERNELS:
        monkeypatch.setattr(module, name, Recorder(name))
    return recorded


def meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _geometry(k=1):
    return dict(stride=(1, 1, 1), padding=((k - 1) // 2,) * 3, dilation=(1, 1, 1))


# ---------------------------------------------------------------------------------------------
# TF32: torch's precision API
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def conv_precision():
    """Sets ``torch.backends.cudnn.conv.fp32_precision`` for the test, restores it after."""
    conv = torch.backends.cudnn.conv
    old = conv.fp32_precision
    yield lambda value: setattr(conv, "fp32_precision", value)
    conv.fp32_precision = old


def test_tf32_read_through_the_precision_api(conv_precision):
    conv_precision("ieee")
    with pytest.raises(RuntimeError):  # what reading the legacy flag does now
        torch.backends.cudnn.allow_tf32
    assert _algos.allow_tf32() is False
    x, w = torch.randn(1, 3, 5, 4, 5), torch.randn(4, 3, 3, 2, 3)
    b = torch.randn(4)
    y = lk3d.conv3d(x, w, b, padding=1)  # fp32 through the kernels: reads the setting
    assert rel_err(y, conv3d_ref(x, w, b, padding=1)) < TOL[torch.float32]
    factors = lk3d.CPFactors(*(torch.randn(n, 2) for n in (4, 3, 3, 2, 3)))
    with_kernels = pytest.MonkeyPatch.context()
    with with_kernels as mp:
        mp.setattr(cp_ops, "USE_KERNELS", True)
        y = lk3d.cp_conv3d(x, factors, b, padding=1)
    assert rel_err(y, conv3d_ref(x, factors.to_dense(), b, padding=1)) < TOL[torch.float32]
    conv_precision("tf32")
    assert _algos.allow_tf32() is True


# ---------------------------------------------------------------------------------------------
# Launch grids
# ---------------------------------------------------------------------------------------------

def _launch_everything_big():
    """One launch of every launcher whose old grid put more than 65,535 programs on y or z."""
    many = GRID_YZ + 5
    # depthwise: batch x channels was grid axis y
    x, w = meta(many, 1, 4, 4, 4), meta(1, 1, 3, 3, 3)
    tiled.conv3d_dw_fwd(x, w, None, (1, 1, 1), (1,) * 6, (1, 1, 1), {"BLOCK": 64})
    tiled.conv3d_dw_bwd_input(meta(many, 1, 4, 4, 4), w, (many, 1, 4, 4, 4), (1, 1, 1),
                              (1,) * 6, (1, 1, 1), {"BLOCK": 64})
    # implicit GEMM and its grad-weight: groups were axis z / y
    x, w = meta(1, 2 * many, 2, 2, 2), meta(2 * many, 2, 1, 1, 1)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    tiled.conv3d_fwd(x, w, None, (1, 1, 1), (0,) * 6, (1, 1, 1), many, cfg)
    tiled.conv3d_bwd_input(x, w, tuple(x.shape), (1, 1, 1), (0,) * 6, (1, 1, 1), many, cfg)
    tiled.conv3d_bwd_weight(x, x, tuple(w.shape), (1, 1, 1), (0,) * 6, (1, 1, 1), many,
                            dict(BLOCK_CO=16, BLOCK_CI=16, BLOCK_K=16, SPLIT=1))
    # reductions split over many programs: the split was axis z / y
    dy = meta(1, 2, many, 1, 1)
    tiled.conv3d_dw_bwd_weight(dy, dy, (2, 1, 1, 1, 1), (1, 1, 1), (0,) * 6, (1, 1, 1),
                               dict(BLOCK_T=16, BLOCK_S=1, SPLIT=many))
    tiled.bias_grad(dy, dict(BLOCK_S=1, SPLIT=many))
    # block-sparse: block rows were axis y, the grad-values split too
    rows = many
    values = meta(rows, 1, 1, 1, 1, 1)
    row_ptr = torch.arange(rows + 1, dtype=torch.int32, device="meta")
    col = torch.zeros(rows, dtype=torch.int32, device="meta")
    x = meta(1, 1, 2, 2, 2)
    bs.block_sparse_fwd(x, values, row_ptr, col, (rows, 1, 1, 1, 1), (1, 1, 1, 1, 1), None,
                        (1, 1, 1), (0,) * 6, (1, 1, 1), 1, {"BLOCK_M": 16})
    dy = meta(1, 2, many, 1, 1)
    values = meta(2, 2, 1, 1, 1, 1)
    bs.block_sparse_bwd_values(dy, meta(1, 1, many, 1, 1), values,
                               torch.tensor([0, 2], dtype=torch.int32, device="meta"),
                               torch.zeros(2, dtype=torch.int32, device="meta"),
                               (2, 1, 1, 1, 1), (2, 1, 1, 1, 1), (1, 1, 1), (0,) * 6,
                               (1, 1, 1), 2, dict(BLOCK_S=1, SPLIT=many))


def test_launch_grids_within_cuda_limits(launches):
    _launch_everything_big()
    names = {name for name, _, _ in launches}
    assert names >= {"conv3d_dw_kernel", "conv3d_igemm_kernel", "conv3d_wgrad_kernel",
                     "conv3d_dw_wgrad_kernel", "bias_grad_kernel", "bs_conv3d_kernel",
                     "bs_conv3d_wgrad_kernel"}, names
    for name, grid, _ in launches:
        assert grid[0] < 2 ** 31, (name, grid)
        assert all(g <= GRID_YZ for g in grid[1:]), f"{name}: grid {grid} past y/z limits"


# ---------------------------------------------------------------------------------------------
# int64 voxel indices
# ---------------------------------------------------------------------------------------------

def test_wide_flag_past_2_31_voxels(launches):
    big = meta(2, 1, 1100, 1100, 1100)  # 2.66e9 voxels, 1.33e9 per sample
    w = meta(1, 1, 1, 1, 1)
    cfg = dict(BLOCK_M=128, BLOCK_N=16, BLOCK_K=16)
    tiled.conv3d_fwd(big, w, None, (1, 1, 1), (0,) * 6, (1, 1, 1), 1, cfg)
    tiled.conv3d_fwd(meta(2, 1, 9, 9, 9), w, None, (1, 1, 1), (0,) * 6, (1, 1, 1), 1, cfg)
    # a weight whose elements pass 2**31 needs int64 offsets as well
    tiled.conv3d_fwd(meta(1, 1 << 16, 1, 1, 1), meta(1 << 15, 1 << 16, 1, 1, 1), None,
                     (1, 1, 1), (0,) * 6, (1, 1, 1), 1, cfg)
    tiled.conv3d_dw_bwd_weight(big, big, (1, 1, 1, 1, 1), (1, 1, 1), (0,) * 6, (1, 1, 1),
                               dict(BLOCK_T=16, BLOCK_S=128, SPLIT=4))
    tiled.bias_grad(big, dict(BLOCK_S=1024, SPLIT=4))
    factors = [meta(1, 2), meta(1, 2), meta(1, 2), meta(1, 2), meta(1, 2)]
    cpk.cp_conv3d_fwd(big, *factors, None, None, (1, 1, 1), (0,) * 6, (1, 1, 1),
                      dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=32))
    wide = [(name, kwargs["WIDE"]) for name, _, kwargs in launches]
    assert wide == [("conv3d_igemm_kernel", True), ("conv3d_igemm_kernel", False),
                    ("conv3d_igemm_kernel", True), ("conv3d_dw_wgrad_kernel", True),
                    ("bias_grad_kernel", True), ("cp_conv_kernel", True)]


def test_one_sample_past_2_31_voxels_is_a_clear_error(launches):
    x = meta(1, 1, 1300, 1300, 1300)
    with pytest.raises(ValueError, match="voxels per sample"):
        tiled.conv3d_dw_fwd(x, meta(1, 1, 1, 1, 1), None, (1, 1, 1), (0,) * 6, (1, 1, 1),
                            {"BLOCK": 64})


def test_planner_leaves_the_kernels_past_the_volume_limit():
    """One sample past 2**31 voxels: lk3d.conv3d's plans take aten or the FFT, never the kernels
    (which would refuse it); below the limit the kernels serve (the interpreter prefers them)."""
    w = torch.randn(1, 1, 3, 3, 3)
    big = torch.zeros(1, dtype=torch.float32).expand(1, 1, 1300, 1300, 1300)  # no memory
    assert {p["algo"] for p in lk3d.explain(big, w, padding=1).values()} <= {"aten", "fft"}
    small = torch.randn(1, 1, 6, 6, 6)
    assert {p["algo"] for p in lk3d.explain(small, w, padding=1).values()} == {"tiled"}


@triton.jit
def _decode_kernel(i_ptr, out_ptr, SD, SH, SW, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    o = common.widen(tl.load(i_ptr), WIDE) * BLOCK + tl.arange(0, BLOCK)
    n, d, h, w = common.split_flat(o, SD, SH, SW, WIDE)
    p = out_ptr + tl.arange(0, BLOCK) * 5
    tl.store(p, o)
    tl.store(p + 1, n)
    tl.store(p + 2, d)
    tl.store(p + 3, h)
    tl.store(p + 4, w)


def test_wide_decode_is_exact_past_2_31():
    block, size = 64, (97, 101, 103)
    start = (2 ** 31 + 12345) // block  # the tile's first voxel is past 2**31
    out = torch.empty(block, 5, dtype=torch.int64)
    _decode_kernel[(1,)](torch.tensor([start], dtype=torch.int32), out, *size, BLOCK=block,
                         WIDE=True)
    flat = torch.arange(start * block, (start + 1) * block, dtype=torch.int64)
    per = size[0] * size[1] * size[2]
    rest = flat % per
    want = torch.stack([flat, flat // per, rest // (size[1] * size[2]),
                        rest // size[2] % size[1], rest % size[2]], 1)
    assert torch.equal(out, want)


@pytest.fixture
def always_wide(monkeypatch):
    """Every launch takes the int64 index path, small as it is."""
    for module in (tiled, cpk, bs):
        monkeypatch.setattr(module, "wide", lambda *extents, volume=0: True)


@pytest.mark.parametrize("groups,cout,kernel", [(1, 4, (3, 2, 3)), (3, 3, (3, 3, 1))],
                         ids=["dense", "depthwise"])
def test_wide_path_computes_the_same(always_wide, groups, cout, kernel):
    x = torch.randn(2, 3, 5, 6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(cout, 3 // groups, *kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(cout, dtype=torch.float64, requires_grad=True)
    args = dict(stride=(2, 1, 1), padding=1, groups=groups)
    y = lk3d.conv3d(x, w, b, **args)
    ref = torch.nn.functional.conv3d(x, w, b, **args)
    assert rel_err(y, ref) < TOL[torch.float64]
    gy = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(y, (x, w, b), gy),
                         torch.autograd.grad(ref, (x, w, b), gy)):
        assert rel_err(got, want) < TOL[torch.float64] * 10


def test_wide_path_cp_and_block_sparse(always_wide, monkeypatch):
    monkeypatch.setattr(cp_ops, "USE_KERNELS", True)
    monkeypatch.setattr(bs_ops, "USE_KERNELS", True)
    x = torch.randn(2, 4, 5, 4, 6, dtype=torch.float64)
    factors = lk3d.CPFactors(*(torch.randn(n, 3, dtype=torch.float64) for n in (4, 4, 3, 3, 3)))
    y = lk3d.cp_conv3d(x, factors, None, padding=1)
    assert rel_err(y, conv3d_ref(x, factors.to_dense(), None, padding=1)) < TOL[torch.float64]
    ws = lk3d.BlockSparseWeight.from_dense(torch.randn(4, 4, 3, 3, 3, dtype=torch.float64),
                                           (2, 2, 1, 1, 1), density=0.5)
    y = lk3d.block_sparse_conv3d(x, ws, None, padding=1)
    assert rel_err(y, conv3d_ref(x, ws.to_dense(), None, padding=1)) < TOL[torch.float64]


# ---------------------------------------------------------------------------------------------
# Zero-size launches (a caller below the ops layer)
# ---------------------------------------------------------------------------------------------

def test_zero_size_launches():
    dy = torch.randn(0, 3, 4, 4, 4)
    x = torch.randn(0, 2, 4, 4, 4)
    g = dict(stride=(1, 1, 1), padding=(1,) * 6, dilation=(1, 1, 1))
    gw = tiled.conv3d_bwd_weight(x, dy, (3, 2, 3, 3, 3), *g.values(), 1,
                                 dict(BLOCK_CO=16, BLOCK_CI=16, BLOCK_K=16, SPLIT=4))
    assert gw.shape == (3, 2, 3, 3, 3) and not gw.any()
    gw = tiled.conv3d_dw_bwd_weight(dy, dy, (3, 1, 3, 3, 3), *g.values(),
                                    dict(BLOCK_T=16, BLOCK_S=16, SPLIT=4))
    assert gw.shape == (3, 1, 3, 3, 3) and not gw.any()
    gb = tiled.bias_grad(dy, dict(BLOCK_S=16, SPLIT=4))
    assert gb.shape == (3,) and not gb.any()
    y = tiled.conv3d_fwd(x, torch.randn(3, 2, 3, 3, 3), None, *g.values(), 1,
                         dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16))
    assert y.shape == (0, 3, 4, 4, 4)
    y = tiled.conv3d_dw_fwd(dy, torch.randn(3, 1, 3, 3, 3), None, *g.values(), {"BLOCK": 64})
    assert y.shape == (0, 3, 4, 4, 4)


# ---------------------------------------------------------------------------------------------
# Operands read through their strides
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups,cout", [(1, 4), (2, 4), (4, 8)], ids=["dense", "grouped", "dw"])
def test_non_contiguous_bias(groups, cout):
    x = torch.randn(2, 4, 5, 6, 5, dtype=torch.float64)
    w = torch.randn(cout, 4 // groups, 3, 2, 3, dtype=torch.float64)
    b = strided_copy(torch.randn(cout, dtype=torch.float64))
    assert not b.is_contiguous()
    y = lk3d.conv3d(x, w, b, padding="same", groups=groups)
    assert rel_err(y, conv3d_ref(x, w, b, padding="same", groups=groups)) < TOL[torch.float64]


def test_non_contiguous_bias_cp_and_block_sparse(monkeypatch):
    monkeypatch.setattr(cp_ops, "USE_KERNELS", True)
    monkeypatch.setattr(bs_ops, "USE_KERNELS", True)
    x = torch.randn(2, 4, 5, 4, 6, dtype=torch.float64)
    b = strided_copy(torch.randn(6, dtype=torch.float64))
    factors = lk3d.CPFactors(*(torch.randn(n, 3, dtype=torch.float64) for n in (6, 4, 3, 1, 3)))
    y = lk3d.cp_conv3d(x, factors, b, padding="same")
    assert rel_err(y, conv3d_ref(x, factors.to_dense(), b, padding="same")) < TOL[torch.float64]
    ws = lk3d.BlockSparseWeight.from_dense(torch.randn(6, 4, 3, 1, 3, dtype=torch.float64),
                                           (3, 2, 1, 1, 1), density=0.5)
    y = lk3d.block_sparse_conv3d(x, ws, b, padding="same")
    assert rel_err(y, conv3d_ref(x, ws.to_dense(), b, padding="same")) < TOL[torch.float64]


@pytest.mark.parametrize("groups,block", [(1, (2, 2, 1, 1, 1)), (4, (2, 1, 3, 1, 1))],
                         ids=["dense", "depthwise"])
def test_strided_block_sparse_index(monkeypatch, groups, block):
    monkeypatch.setattr(bs_ops, "USE_KERNELS", True)
    x = torch.randn(2, 4, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    dense = torch.randn(4, 4 // groups, 3, 3, 3, dtype=torch.float64)
    ws = lk3d.BlockSparseWeight.from_dense(dense, block, density=0.5)
    strided = dataclasses.replace(ws, row_ptr=strided_copy(ws.row_ptr), col=strided_copy(ws.col),
                                  values=ws.values.detach().requires_grad_())
    assert not strided.row_ptr.is_contiguous() and not strided.col.is_contiguous()
    args = dict(padding=1, groups=groups)
    y = lk3d.block_sparse_conv3d(x, strided, None, **args)
    dense = ws.to_dense().requires_grad_()
    ref = torch.nn.functional.conv3d(x, dense, None, **args)
    assert rel_err(y, ref) < TOL[torch.float64]
    gy = torch.randn_like(ref)
    gx, gv = torch.autograd.grad(y, (x, strided.values), gy)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, dense), gy)
    assert rel_err(gx, gx_ref) < TOL[torch.float64] * 10
    assert rel_err(gv, stored_blocks(gw_ref, block, ws.row_ptr, ws.col)) < TOL[torch.float64] * 10


def test_voxel_axis_tie_break_by_version():
    assert common.tie_goes_last("3.6.0") is False
    assert common.tie_goes_last("3.7.1") is True
    assert common.tie_goes_last("3.10.0+git1234") is True
