"""``lk3d.CPFactors`` (``lk3d.cp_factors``): the container, its dense weight, and its argument
errors."""
import pytest
import torch

import lk3d
from _cases import Case, raises_naming


def test_factors_container():
    x, f, _ = Case.cp(2, 5, 3, (11, 7, 6), (7, 3, 5), 8, padding="same").tensors()
    assert f.rank == 8 and f.kernel_size == (7, 3, 5)
    assert (f.out_channels, f.in_channels) == (3, 5)
    assert f.dtype == torch.float64 and f.device == torch.device("cpu")
    dense = f.to_dense()
    assert dense.shape == (3, 5, 7, 3, 5)
    o, i, a, b, c = 2, 4, 6, 1, 3
    want = sum(f.U_out[o, r] * f.weights[r] * f.U_in[i, r] * f.A[a, r] * f.B[b, r] * f.C[c, r]
               for r in range(f.rank))
    torch.testing.assert_close(dense[o, i, a, b, c], want)
    assert f.to(torch.float32).dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in f.to(torch.float32).tensors())
    assert "rank=8" in repr(f) and "kernel_size=(7, 3, 5)" in repr(f)
    with pytest.raises(AttributeError):
        f.rank = 3


def _mats(rows=(4, 3, 3, 5, 2), rank=2, **kw):
    return [torch.randn(n, rank, **kw) for n in rows]


FACTOR_ERRORS = [  # (U_out, U_in, A, B, C, weights), error, what the message names
    ((*_mats(rank=0), None), ValueError, ["rank", "at least 1"]),
    ((*_mats()[:4], torch.randn(2, 3), None), ValueError, ["rank", "C (2, 3)", "U_out (4, 2)"]),
    ((torch.randn(4, 2, 1), *_mats()[1:], None), ValueError, ["U_out", "2-D", "(4, 2, 1)"]),
    ((*_mats()[:2], torch.randn(0, 2), *_mats()[3:], None), ValueError, ["A", "(0, 2)"]),
    ((*_mats(), torch.randn(3)), ValueError, ["weights", "(2,)", "(3,)"]),
    ((*_mats()[:3], torch.randn(5, 2, dtype=torch.float64), torch.randn(2, 2), None), TypeError,
     ["B", "float32", "float64"]),
    ((*_mats()[:4], torch.randn(2, 2, device="meta"), None), ValueError,
     ["C", "cpu", "meta"]),
    ((*_mats()[:1], torch.ones(3, 2, dtype=torch.int64), *_mats()[2:], None), TypeError,
     ["U_in", "int64"]),
    ((*_mats()[:4], [[1.0, 2.0]], None), TypeError, ["C", "list"]),
]


@pytest.mark.parametrize("tensors, error, names", FACTOR_ERRORS,
                         ids=["rank0", "ranks-disagree", "3d", "empty-A", "weights-shape",
                              "dtype", "device", "int", "list"])
def test_factors_errors(tensors, error, names):
    with raises_naming(error, names):
        lk3d.CPFactors(*tensors)
