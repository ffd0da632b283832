"""``lk3d.BlockSparseWeight`` (``lk3d.block_sparse_weight``): the layout, conversions from dense
and COO, masks, pruning, ``with_values``, the container and its argument errors."""
import math

import pytest
import torch

import lk3d
from _cases import raises_naming
from lk3d.block_sparse_weight import stored_blocks


def _dense(shape=(6, 4, 3, 4, 2), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_layout_by_hand():
    w = _dense()
    block = (3, 2, 1, 2, 2)
    ws = lk3d.BlockSparseWeight.from_dense(w, block)
    assert ws.grid == (2, 2, 3, 2, 1) and ws.nnz == 24 and ws.density == 1
    assert ws.row_ptr.dtype == torch.int32 and ws.col.dtype == torch.int32
    assert ws.row_ptr.tolist() == [0, 12, 24]
    NI, ND, NH, NW = ws.grid[1:]
    for r in range(2):
        for k in range(ws.row_ptr[r], ws.row_ptr[r + 1]):
            c = ws.col[k].item()
            ci, rest = divmod(c, ND * NH * NW)
            db, rest = divmod(rest, NH * NW)
            hb, wb = divmod(rest, NW)
            want = w[r * 3:(r + 1) * 3, ci * 2:(ci + 1) * 2, db:db + 1, hb * 2:(hb + 1) * 2,
                     wb * 2:(wb + 1) * 2]
            assert torch.equal(ws.values[k], want)
    assert torch.equal(ws.to_dense(), w)


@pytest.mark.parametrize("block", [(1, 1, 1, 1, 1), (6, 4, 3, 4, 2), (2, 4, 1, 1, 1),
                                   (3, 1, 3, 2, 2), (1, 2, 3, 1, 1)],
                         ids=lambda b: "x".join(map(str, b)))
def test_dense_round_trip_is_exact(block):
    w = _dense()
    ws = lk3d.BlockSparseWeight.from_dense(w, block)
    assert ws.density == 1 and torch.equal(ws.to_dense(), w)
    # Blocks that are all zero are not stored, and come back as zeros.
    w[:, :, 1] = 0
    ws = lk3d.BlockSparseWeight.from_dense(w, block)
    assert torch.equal(ws.to_dense(), w)
    assert (ws.density < 1) == (block[2] == 1)


def test_stored_blocks_inverts_to_dense():
    """``stored_blocks`` (a dense weight gradient back to the stored blocks) undoes
    ``to_dense``, whatever the dense weight holds outside the stored blocks."""
    w = _dense()
    ws = lk3d.BlockSparseWeight.from_dense(w, (3, 2, 1, 2, 2), density=0.5)
    assert ws.nnz == 12
    assert torch.equal(stored_blocks(ws.to_dense(), ws.row_ptr, ws.col, ws.block_shape),
                       ws.values)
    assert torch.equal(stored_blocks(w, ws.row_ptr, ws.col, ws.block_shape), ws.values)


def test_from_dense_density_keeps_the_largest_blocks():
    w = _dense((8, 8, 3, 3, 3), seed=3)
    block = (4, 4, 1, 1, 1)
    norms = w.reshape(2, 4, 2, 4, 27).permute(0, 2, 4, 1, 3).reshape(-1, 16).norm(dim=1)
    for density, count in ((0.25, 27), (0.5, 54), (1 / 108, 1), (0.001, 1), (0.999, 108)):
        ws = lk3d.BlockSparseWeight.from_dense(w, block, density=density)
        assert ws.nnz == count
        kept = ws.block_mask().flatten()
        assert norms[kept].min() >= norms[~kept].max() if count < 108 else kept.all()
        dense = ws.to_dense()
        assert torch.equal(dense[dense != 0], w[dense != 0])
    threshold = norms.median().item()
    ws = lk3d.BlockSparseWeight.from_dense(w, block, threshold=threshold)
    assert torch.equal(ws.block_mask().flatten(), norms > threshold)


def test_from_dense_is_differentiable_and_copies():
    w = _dense().requires_grad_()
    ws = lk3d.BlockSparseWeight.from_dense(w, (2, 2, 1, 2, 1), density=0.5)
    (g,) = torch.autograd.grad(ws.to_dense().sum(), w)
    assert torch.equal(g, (ws.to_dense() != 0).double())
    with torch.no_grad():
        ws.values.zero_()
    assert w.abs().min() > 0


def test_from_coo_round_trip():
    g = torch.Generator().manual_seed(1)
    shape = (6, 4, 5, 3, 4)
    idx = torch.stack([torch.randint(n, (40,), generator=g) for n in shape])
    vals = torch.randn(40, generator=g, dtype=torch.float64)
    vals[:5] = 0  # specified zeros store no block of their own
    # Uncoalesced: repeated indices add up.
    coo = torch.sparse_coo_tensor(idx, vals, shape, check_invariants=True)
    for block in ((2, 2, 1, 1, 1), (3, 1, 5, 3, 2), (6, 4, 5, 3, 4), (1, 1, 1, 1, 1)):
        ws = lk3d.BlockSparseWeight.from_coo(coo, block)
        assert torch.equal(ws.to_dense(), coo.to_dense())
        want = lk3d.BlockSparseWeight.from_dense(coo.to_dense(), block)
        assert ws.nnz >= want.nnz
    empty = torch.sparse_coo_tensor(torch.zeros(5, 0, dtype=torch.long),
                                    torch.zeros(0, dtype=torch.float64), shape,
                                    check_invariants=True)
    assert lk3d.BlockSparseWeight.from_coo(empty, (2, 2, 1, 1, 1)).nnz == 0


def test_with_mask_and_prune():
    w = _dense((4, 4, 3, 3, 3), seed=2)
    block = (2, 2, 1, 1, 1)
    ws = lk3d.BlockSparseWeight.from_dense(w, block, density=0.5)
    mask = ws.block_mask()
    flip = torch.zeros_like(mask)
    flip[0, 0] = True
    flip[1, 1, 2] = True
    new = ws.with_mask(mask ^ flip)
    assert torch.equal(new.block_mask(), mask ^ flip)
    dense, new_dense = ws.to_dense(), new.to_dense()
    kept = (mask & ~flip).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(new_dense[kept], dense[kept])
    assert new_dense[~kept].abs().max() == 0  # dropped blocks and new (zero) blocks
    assert lk3d.BlockSparseWeight.from_dense(w, block, threshold=math.inf).with_mask(
        mask).to_dense().abs().max() == 0
    # with_mask is differentiable in the values it keeps.
    v = ws.values.clone().requires_grad_()
    moved = lk3d.BlockSparseWeight(ws.shape, block, v, ws.row_ptr, ws.col).with_mask(mask ^ flip)
    (g,) = torch.autograd.grad(moved.values.sum(), v)
    assert g.sum() == (mask & ~flip).sum() * 4

    # with_values: the same pattern, other values, differentiable in them.
    v2 = torch.randn_like(ws.values).requires_grad_()
    swapped = ws.with_values(v2)
    assert swapped.row_ptr is ws.row_ptr and swapped.col is ws.col and swapped.values is v2
    assert torch.equal(swapped.to_dense() != 0, ws.to_dense() != 0)
    (g,) = torch.autograd.grad(swapped.to_dense().sum(), v2)
    assert torch.equal(g, torch.ones_like(v2))

    pruned = ws.prune(density=0.25)
    assert ws.nnz == 54 and pruned.nnz == 27  # of 108 blocks
    norms = ws.values.flatten(1).norm(dim=1)
    assert torch.equal(pruned.values.flatten(1).norm(dim=1).sort().values,
                       norms.sort(descending=True).values[:27].sort().values)
    assert ws.prune(density=1.0).nnz == ws.nnz  # never more than stored
    assert ws.prune(threshold=math.inf).nnz == 0
    assert ws.prune().nnz == ws.nnz
    assert torch.equal(ws.prune(threshold=norms.median().item()).block_mask().sum(),
                       (norms > norms.median()).sum())


def test_container():
    ws = lk3d.BlockSparseWeight.from_dense(_dense(), (3, 2, 1, 2, 2), density=0.5)
    assert ws.shape == (6, 4, 3, 4, 2) and ws.block_shape == (3, 2, 1, 2, 2)
    assert ws.nnz == 12 and ws.density == 0.5
    assert ws.nbytes == 12 * 24 * 8 + 3 * 4 + 12 * 4
    assert ws.dtype == torch.float64 and ws.device == torch.device("cpu")
    f32 = ws.to(torch.float32)
    assert f32.dtype == torch.float32 and f32.row_ptr.dtype == torch.int32
    assert torch.equal(f32.to_dense(), ws.to_dense().float())
    meta = ws.to("meta")
    assert meta.device.type == "meta" and meta.col.device.type == "meta"
    assert meta.to_dense().shape == ws.shape
    assert "nnz=12" in repr(ws) and "block_shape=(3, 2, 1, 2, 2)" in repr(ws)
    with pytest.raises(AttributeError):
        ws.values = ws.values
    # Lists and torch.Size are accepted for the shapes, and kept as tuples.
    same = lk3d.BlockSparseWeight(list(ws.shape), torch.Size(ws.block_shape), ws.values,
                                  ws.row_ptr, ws.col)
    assert same.shape == ws.shape and same.block_shape == ws.block_shape


def _parts():
    ws = lk3d.BlockSparseWeight.from_dense(_dense(), (3, 2, 1, 2, 2), density=0.5)
    return dict(shape=ws.shape, block_shape=ws.block_shape, values=ws.values,
                row_ptr=ws.row_ptr, col=ws.col)


def _bad_row_ptr():
    rp = _parts()["row_ptr"].clone()
    rp[1] = 13
    return rp


def _bad_col_order():
    col = _parts()["col"].clone()
    col[[0, 1]] = col[[1, 0]]
    return col


CONTAINER_ERRORS = [  # (changed parts, error, what the message names)
    (dict(block_shape=(4, 2, 1, 2, 2)), ValueError, ["block_shape", "out_channels 6", "4"]),
    (dict(block_shape=(3, 2, 2, 2, 2)), ValueError, ["block_shape[2]", "kernel depth 3"]),
    (dict(block_shape=(3, 2, 1, 2)), TypeError, ["block_shape", "5 ints"]),
    (dict(block_shape=(3, 0, 1, 2, 2)), ValueError, ["block_shape", "positive"]),
    (dict(shape=(6, 4, 3, 4, 2.0)), TypeError, ["shape", "5 ints"]),
    (dict(values=torch.zeros(12, 3, 2, 1, 2)), ValueError, ["values", "[nnz, 3, 2, 1, 2, 2]"]),
    (dict(values=torch.zeros(12, 3, 2, 1, 2, 2, dtype=torch.int64)), TypeError,
     ["values", "floating", "int64"]),
    (dict(row_ptr=torch.tensor([0, 6, 12])), TypeError, ["row_ptr", "int32", "int64"]),
    (dict(row_ptr=torch.tensor([0, 12], dtype=torch.int32)), ValueError,
     ["row_ptr", "length 3", "(2,)"]),
    (dict(row_ptr=torch.tensor([0, 8, 6], dtype=torch.int32)), ValueError,
     ["row_ptr", "non-decreasing", "nnz = 12"]),
    (dict(row_ptr=_bad_row_ptr()), ValueError, ["row_ptr", "non-decreasing"]),
    (dict(col=torch.zeros(11, dtype=torch.int32)), ValueError, ["col", "length 12", "(11,)"]),
    (dict(col=torch.arange(12, dtype=torch.float32)), TypeError, ["col", "int32", "float32"]),
    (dict(col=torch.arange(12, dtype=torch.int32) * 4), ValueError, ["col", "[0, 12)", "44"]),
    (dict(col=_bad_col_order()), ValueError, ["col", "ascending"]),
    (dict(col=torch.zeros(12, dtype=torch.int32, device="meta")), ValueError,
     ["col", "cpu", "meta"]),
    (dict(row_ptr=[0, 6, 12]), TypeError, ["row_ptr", "Tensor", "list"]),
]


@pytest.mark.parametrize("changes, error, names", CONTAINER_ERRORS,
                         ids=["bo", "bd", "block-len", "block0", "shape-float", "values-shape",
                              "values-int", "row_ptr-int64", "row_ptr-len", "row_ptr-down",
                              "row_ptr-end", "col-len", "col-float", "col-range", "col-order",
                              "col-device", "row_ptr-list"])
def test_container_errors(changes, error, names):
    with raises_naming(error, names):
        lk3d.BlockSparseWeight(**{**_parts(), **changes})


def _coo(shape=(4, 4, 3, 3, 3), dtype=torch.float64):
    return torch.sparse_coo_tensor(torch.zeros(len(shape), 1, dtype=torch.long),
                                   torch.ones(1, dtype=dtype), shape, check_invariants=True)


CONVERSION_ERRORS = [  # (call, error, what the message names)
    (lambda: lk3d.BlockSparseWeight.from_dense(_dense(), (4, 2, 1, 1, 1)), ValueError,
     ["block_shape", "out_channels 6"]),
    (lambda: lk3d.BlockSparseWeight.from_dense(_dense(), (3, 3, 1, 1, 1)), ValueError,
     ["block_shape[1]", "in_channels per group 4"]),
    (lambda: lk3d.BlockSparseWeight.from_dense(_dense(), (3, 2, 1, 1, 1), density=0),
     ValueError, ["density", "(0, 1]", "0"]),
    (lambda: lk3d.BlockSparseWeight.from_dense(_dense(), (3, 2, 1, 1, 1), density=1.5),
     ValueError, ["density", "(0, 1]", "1.5"]),
    (lambda: lk3d.BlockSparseWeight.from_dense(_dense(), (3, 2, 1, 1, 1), density="half"),
     TypeError, ["density", "'half'"]),
    (lambda: lk3d.BlockSparseWeight.from_dense(_dense(), (3, 2, 1, 1, 1), threshold=-1.0),
     ValueError, ["threshold", "-1.0"]),
    (lambda: lk3d.BlockSparseWeight.from_dense(_dense(), (3, 2, 1, 1, 1), threshold=0.1,
                                               density=0.5),
     ValueError, ["threshold", "density", "at most one"]),
    (lambda: lk3d.BlockSparseWeight.from_dense(_dense()[0], (3, 2, 1, 1, 1)), ValueError,
     ["weight", "5-D", "4-D"]),
    (lambda: lk3d.BlockSparseWeight.from_coo(_coo((4, 4, 3, 3)), (2, 2, 1, 1, 1)), ValueError,
     ["coo", "5-D", "(4, 4, 3, 3)"]),
    (lambda: lk3d.BlockSparseWeight.from_coo(_coo((4, 4, 3, 3, 3, 1)), (2, 2, 1, 1, 1)),
     ValueError, ["coo", "5-D", "(4, 4, 3, 3, 3, 1)"]),
    (lambda: lk3d.BlockSparseWeight.from_coo(_coo(), (3, 2, 1, 1, 1)), ValueError,
     ["block_shape", "out_channels 4"]),
    (lambda: lk3d.BlockSparseWeight.from_coo(_coo(dtype=torch.int64), (2, 2, 1, 1, 1)),
     TypeError, ["coo", "floating", "int64"]),
    (lambda: lk3d.BlockSparseWeight.from_coo(_coo().to_dense(), (2, 2, 1, 1, 1)), TypeError,
     ["coo", "sparse_coo", "strided"]),
    (lambda: lk3d.BlockSparseWeight.from_coo([1.0], (2, 2, 1, 1, 1)), TypeError,
     ["coo", "list"]),
    (lambda: lk3d.BlockSparseWeight.from_dense(_dense(), (3, 2, 1, 2, 2)).with_mask(
        torch.ones(2, 2, 3, 2, 2, dtype=torch.bool)), ValueError,
     ["block_mask", "(2, 2, 3, 2, 1)", "(2, 2, 3, 2, 2)"]),
    (lambda: lk3d.BlockSparseWeight.from_dense(_dense(), (3, 2, 1, 2, 2)).with_mask(
        torch.ones(2, 2, 3, 2, 1)), TypeError, ["block_mask", "bool", "float32"]),
    (lambda: lk3d.BlockSparseWeight.from_dense(_dense(), (3, 2, 1, 2, 2)).prune(density=2),
     ValueError, ["density", "(0, 1]"]),
    (lambda: lk3d.BlockSparseWeight.from_dense(_dense(), (3, 2, 1, 2, 2), density=0.5)
     .with_values(torch.zeros(3, 3, 2, 1, 2, 2)), ValueError, ["values", "12 blocks", "got 3"]),
    (lambda: lk3d.BlockSparseWeight.from_dense(_dense(), (3, 2, 1, 2, 2), density=0.5)
     .with_values(torch.zeros(12, 3, 2, 1, 2, 1)), ValueError, ["values", "3, 2, 1, 2, 2"]),
]


@pytest.mark.parametrize("call, error, names", CONVERSION_ERRORS,
                         ids=["dense-bo", "dense-bi", "density0", "density1.5", "density-str",
                              "threshold-neg", "both", "dense-4d", "coo-4d", "coo-6d",
                              "coo-block", "coo-int", "coo-strided", "coo-list", "mask-shape",
                              "mask-float", "prune-density", "values-count", "values-block"])
def test_conversion_errors(call, error, names):
    with raises_naming(error, names):
        call()
