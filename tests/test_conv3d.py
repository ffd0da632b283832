"""lk3d.conv3d against a float64 F.conv3d reference: forward, backward, layouts, dtypes, fuzz.

On a CPU-only machine these run the Triton kernels in the interpreter (tests/conftest.py); with
LK3D_TEST_DEVICE=cuda the same cases run on the GPU.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lk3d
from _cases import (CASES, TOL, Case, conv3d_ref, rel_err, scaled_err, strided_copy,
                    with_layout)
from lk3d.kernels import common


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer a launcher allocates starts as NaN."""
    monkeypatch.setattr(common, "POISON", True)


@pytest.mark.gpu_run
def test_kernels_serve_the_test_device(device):
    x = torch.randn(1, 2, 5, 5, 5, device=device)
    w = torch.randn(2, 1, 3, 3, 3, device=device)
    plans = lk3d.explain(x, w, groups=2)
    assert {p["algo"] for p in plans.values()} == {"tiled"}, plans


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_backward_float64(case, device):
    x, w, b = case.tensors(device=device)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    x, w = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    b = None if b is None else b.to(dtype).requires_grad_()
    y = lk3d.conv3d(x, w, b, **case.args())
    xr, wr = x.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    br = None if b is None else b.detach().double().cpu().requires_grad_()
    ref = torch.nn.functional.conv3d(xr, wr, br, **case.args())
    assert y.dtype == x.dtype
    assert rel_err(y, ref) < TOL[dtype]

    gy = torch.randn(ref.shape, dtype=torch.float64)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], gy.to(y))
    refs = torch.autograd.grad(ref, [t for t in (xr, wr, br) if t is not None], gy)
    for name, got, want in zip(("input", "weight", "bias"), grads, refs):
        assert got.shape == want.shape, name
        assert rel_err(got, want) < TOL[dtype] * 10, name


@pytest.mark.parametrize("layout", ["channels_last_3d", "strided", "permuted"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[11]], ids=lambda c: c.id)
def test_layouts(case, layout, device):
    """Non-contiguous and channels_last_3d inputs (and a non-contiguous weight) are read through
    their strides; the output keeps the input's memory format, as F.conv3d's does."""
    x, w, b = case.tensors(device=device, dtype=torch.float32)
    x, w = with_layout(x, w, layout)
    x_before, w_before = x.clone(), w.clone()
    y = lk3d.conv3d(x, w, b, **case.args())
    assert rel_err(y, conv3d_ref(x, w, b, **case.args())) < TOL[torch.float32]
    assert torch.equal(x, x_before) and torch.equal(w, w_before), "inputs were modified"
    if layout == "channels_last_3d":
        assert y.is_contiguous(memory_format=torch.channels_last_3d)
        gx, = torch.autograd.grad(lk3d.conv3d(x.requires_grad_(), w, b, **case.args()),
                                  x, torch.randn_like(y))
        assert gx.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_low_precision(dtype, device, no_tf32):
    case = CASES[1]
    x, w, b = case.tensors(dtype=dtype, device=device)
    y = lk3d.conv3d(x, w, b, **case.args())
    assert y.dtype == dtype
    assert rel_err(y, conv3d_ref(x, w, b, **case.args())) < TOL[dtype]


def test_unbatched_and_empty_batch(device):
    case = CASES[3]
    x, w, b = case.tensors(device=device, dtype=torch.float32)
    y = lk3d.conv3d(x[0], w, b, **case.args())
    assert y.shape == conv3d_ref(x, w, b, **case.args())[0].shape
    assert rel_err(y, conv3d_ref(x[0], w, b, **case.args())) < TOL[torch.float32]
    empty = lk3d.conv3d(x[:0], w, b, **case.args())
    assert empty.shape == (0, *y.shape)


@pytest.mark.parametrize("case", [
    Case(1, 2, 3, (3, 4, 3), (2, 3, 2), stride=(2, 1, 1), padding=1),
    Case(2, 4, 2, (4, 3, 3), (3, 2, 2), dilation=(1, 2, 1), padding="same", groups=2),
    Case(1, 2, 4, (5, 3, 4), (3, 3, 3), stride=2, padding=1, groups=2),
], ids=lambda c: c.id)
def test_gradcheck(case, device):
    if device.type != "cpu":
        pytest.skip("float64 kernels run in the interpreter; CUDA float64 goes to aten")
    x, w, b = (t.requires_grad_() for t in case.tensors())
    assert torch.autograd.gradcheck(lambda *t: lk3d.conv3d(*t, **case.args()), (x, w, b),
                                    fast_mode=True)


@st.composite
def fuzz_cases(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.sampled_from([1, 2] * 4 + [0]))  # sometimes no channels, as F.conv3d
    cout = groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(3))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(3))
    padding = draw(st.one_of(st.sampled_from(["same", "valid"]),
                             st.tuples(*[st.integers(0, 2)] * 3)))
    stride = (1, 1, 1) if padding == "same" else tuple(draw(st.integers(1, 3)) for _ in range(3))
    pads = (0, 0, 0) if isinstance(padding, str) else padding
    size = tuple(max(draw(st.integers(1, 6)), d * (k - 1) + 1 - 2 * p)
                 for k, d, p in zip(kernel, dilation, pads))
    return Case(draw(st.integers(1, 2)), cin, cout, size, kernel, stride, padding, dilation,
                groups, draw(st.booleans()))


# ~0.5 s an example under the interpreter: 60 of them keep CI within its time.
@settings(max_examples=60)
@given(case=fuzz_cases(), seed=st.integers(0, 2**16), strided_bias=st.booleans())
def test_fuzz_forward(case, seed, strided_bias):
    from conftest import DEVICE
    x, w, b = case.tensors(device=DEVICE, seed=seed, dtype=torch.float32)
    if strided_bias and b is not None:
        b = strided_copy(b)
    y = lk3d.conv3d(x, w, b, **case.args())
    assert scaled_err(y, x, w, b, **case.args()) < TOL[torch.float32]
