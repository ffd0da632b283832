"""An input without channels, on every algorithm: lk3d.conv3d does what F.conv3d does.

F.conv3d gives such an input an output without channels (``[N, 0, *out]``, whatever the weight's
``Cout`` and the bias; torch's meta function says so too), a grad-input and a grad-weight without
elements, and a bias gradient of zeros. lk3d.conv3d follows it with ``LK3D_ALGO`` forced to
``aten``, ``fft`` and ``tiled`` (the Triton kernels, interpreted on the CPU), with and without
bias, grouped, strided and padded, on real tensors, fake ones (``opcheck``) and the meta device.
"""
import pytest
import torch
import torch.nn.functional as F

import lk3d
from _cases import Case
from lk3d._spec import check_conv3d

CASES = [
    Case(2, 0, 4, (6, 6, 6), (3, 3, 3)),
    Case(1, 0, 4, (7, 5, 6), (3, 2, 3), stride=2, padding=(1, 0, 1), bias=False),
    Case(2, 0, 6, (5, 6, 5), (2, 3, 3), padding="same", dilation=(1, 2, 1), groups=2),
    Case(0, 0, 3, (4, 4, 4), (3, 3, 3), padding=1),  # no sample either
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("algo", ["aten", "fft", "tiled"])
def test_matches_conv3d(algo, case, monkeypatch):
    monkeypatch.setenv("LK3D_ALGO", algo)
    x, w, b = (None if t is None else t.requires_grad_() for t in case.tensors(torch.float32))
    xr, wr, br = (None if t is None else t.detach().double().requires_grad_() for t in (x, w, b))
    y = lk3d.conv3d(x, w, b, **case.args())
    want = F.conv3d(xr, wr, br, **case.args())
    assert y.shape == want.shape and y.dtype == x.dtype
    gy = torch.ones(want.shape, dtype=torch.float64)
    leaves = [t for t in (x, w, b) if t is not None]
    refs = [t for t in (xr, wr, br) if t is not None]
    for name, g, r in zip(("input", "weight", "bias"), torch.autograd.grad(y, leaves, gy.float()),
                          torch.autograd.grad(want, refs, gy)):
        assert g.shape == r.shape, name
        assert torch.equal(g.double(), r), name


def test_opcheck_and_meta():
    case = CASES[2]
    x, w, b = case.tensors(dtype=torch.float32)
    spec = check_conv3d(x, w, b, **case.args())
    torch.library.opcheck(torch.ops.lk3d.conv3d.default,
                          (x, w, b, list(spec.stride), spec.padding, list(spec.dilation), 2))
    y = lk3d.conv3d(x.to("meta"), w.to("meta"), b.to("meta"), **case.args())
    assert y.device.type == "meta"
    assert y.shape == F.conv3d(x, w, b, **case.args()).shape
