"""The block-sparse weight format: ``lk3d.BlockSparseWeight``, its builders and its checks.

A block-sparse weight stands for a dense weight ``[Cout, Cin/g, kd, kh, kw]`` cut into blocks of
``block_shape = (bo, bi, bd, bh, bw)``, of which only some are stored (CSR over output-channel
block rows)::

    values   [nnz, bo, bi, bd, bh, bw]   the stored blocks
    row_ptr  int32 [NO + 1]              NO = Cout // bo; row r holds row_ptr[r]:row_ptr[r+1]
    col      int32 [nnz]                 flat block index ((ci·ND + db)·NH + hb)·NW + wb over
                                         (NI, ND, NH, NW) = (Cin/g / bi, kd / bd, kh / bh, kw / bw),
                                         strictly ascending within each row

    dense[r·bo:(r+1)·bo, ci·bi:(ci+1)·bi, db·bd:.., hb·bh:.., wb·bw:..] = values[k]

``lk3d.block_sparse`` holds the convolution with such a weight; the functions here
(``dense_weight``, ``stored_blocks``, ``weight_blocks``, ``block_keys``) convert between the
stored blocks and the dense weight for it.
"""
import math
from dataclasses import dataclass
from numbers import Integral, Real

import torch

from lk3d._spec import check_tensor

__all__ = ["BlockSparseWeight", "check_block_shape", "check_threshold", "block_count",
           "five_ints", "dense_weight", "stored_blocks", "weight_blocks", "block_keys"]

_DIMS = ("out_channels", "in_channels per group", "kernel depth", "kernel height",
         "kernel width")


def five_ints(name, value):
    """``value`` (a tuple, list or ``torch.Size`` of 5 ints >= 1) as a tuple of 5 ints, else a
    TypeError/ValueError naming ``name``."""
    if isinstance(value, torch.Size):
        value = tuple(value)
    if (not isinstance(value, (tuple, list)) or len(value) != 5
            or any(isinstance(v, bool) or not isinstance(v, Integral) for v in value)):
        raise TypeError(f"{name}: expected a tuple of 5 ints, got {value!r}")
    if any(v < 1 for v in value):
        raise ValueError(f"{name}: expected 5 positive ints, got {tuple(value)}")
    return tuple(int(v) for v in value)


def _check_index(name, t, length, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name}: expected an int32 tensor, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name}: expected a 1-D tensor of length {length}, got shape "
                         f"{tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of values), got "
                         f"{t.device}")


@dataclass(frozen=True, eq=False)
class BlockSparseWeight:
    """A block-sparse weight: ``shape`` ``(Cout, Cin/g, kd, kh, kw)`` of the dense weight it
    stands for, ``block_shape`` ``(bo, bi, bd, bh, bw)`` (each dividing its dim of ``shape``),
    the stored blocks ``values [nnz, bo, bi, bd, bh, bw]`` and their CSR pattern ``row_ptr``
    (int32 ``[Cout/bo + 1]``) and ``col`` (int32 ``[nnz]``); see the module docstring for the
    layout. Checked on construction (``TypeError``/``ValueError`` naming the argument).

    Build one with ``from_dense``, ``from_coo``; change its pattern with ``with_mask`` and
    ``prune``; ``to_dense()`` gives the weight ``F.conv3d`` would take.
    """
    shape: tuple
    block_shape: tuple
    values: torch.Tensor
    row_ptr: torch.Tensor
    col: torch.Tensor

    def __post_init__(self):
        shape = five_ints("shape", self.shape)
        block = five_ints("block_shape", self.block_shape)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "block_shape", block)
        _check_block_shape(shape, block)
        self._check_values(self.values)
        _check_index("row_ptr", self.row_ptr, self.grid[0] + 1, self.values.device)
        _check_index("col", self.col, self.nnz, self.values.device)
        if self.values.device.type != "meta" and not torch.compiler.is_compiling():
            self._check_pattern()

    def _check_values(self, values):
        check_tensor("values", values)
        block = self.block_shape
        if values.dim() != 6 or tuple(values.shape[1:]) != block:
            raise ValueError(f"values: expected shape [nnz, {', '.join(map(str, block))}] (the "
                             f"stored blocks of block_shape {block}), got "
                             f"{tuple(values.shape)}")

    def _check_pattern(self):
        rp, col = self.row_ptr.cpu().long(), self.col.cpu().long()
        counts = rp.diff()
        if rp[0] != 0 or (counts < 0).any() or rp[-1] != self.nnz:
            raise ValueError(f"row_ptr: expected a non-decreasing sequence from 0 to nnz = "
                             f"{self.nnz}, got {rp.tolist()}")
        total = math.prod(self.grid[1:])
        if self.nnz and (col.min() < 0 or col.max() >= total):
            raise ValueError(f"col: expected block indices in [0, {total}) (the blocks of a row, "
                             f"grid {self.grid[1:]}), got values from {col.min().item()} to "
                             f"{col.max().item()}")
        rows = torch.repeat_interleave(torch.arange(self.grid[0]), counts)
        key = rows * total + col
        if self.nnz > 1 and (key.diff() <= 0).any():
            raise ValueError("col: expected strictly ascending block indices within each row "
                             "(no block stored twice)")

    # -- properties ------------------------------------------------------------------------

    @property
    def grid(self) -> tuple:
        """Blocks per dim: ``(NO, NI, ND, NH, NW)``."""
        return tuple(n // b for n, b in zip(self.shape, self.block_shape))

    @property
    def nnz(self) -> int:
        """The number of stored blocks."""
        return self.values.shape[0]

    @property
    def density(self) -> float:
        """Stored blocks over all blocks."""
        return self.nnz / math.prod(self.grid)

    @property
    def nbytes(self) -> int:
        """Bytes held: the values and the two index tensors."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.row_ptr, self.col))

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def __repr__(self):
        return (f"BlockSparseWeight(shape={self.shape}, block_shape={self.block_shape}, "
                f"nnz={self.nnz}, density={self.density:.4g}, dtype={self.dtype}, "
                f"device={self.device})")

    # -- conversions -----------------------------------------------------------------------

    def _keys(self):
        """``row·(NI·ND·NH·NW) + col`` of every stored block (int64, ascending)."""
        return block_keys(self.row_ptr, self.col, self.grid)

    def block_mask(self) -> torch.Tensor:
        """A bool tensor ``[NO, NI, ND, NH, NW]``: which blocks are stored."""
        mask = torch.zeros(math.prod(self.grid), dtype=torch.bool, device=self.device)
        mask[self._keys()] = True
        return mask.view(self.grid)

    def to_dense(self) -> torch.Tensor:
        """The dense weight ``shape`` (zeros outside the stored blocks; differentiable in
        ``values``)."""
        return dense_weight(self.values, self.row_ptr, self.col, self.shape, self.block_shape)

    def to(self, *args, **kwargs) -> "BlockSparseWeight":
        """Moved/cast as ``torch.Tensor.to(*args, **kwargs)`` does: the values take the dtype,
        the index tensors stay int32 and follow the device."""
        values = self.values.to(*args, **kwargs)
        index = [t.to(values.device) for t in (self.row_ptr, self.col)]
        return BlockSparseWeight(self.shape, self.block_shape, values, *index)

    @classmethod
    def _from_mask(cls, blocks, mask):
        """The weight storing ``blocks [NO, NI, ND, NH, NW, bo, bi, bd, bh, bw]`` where ``mask
        [NO, NI, ND, NH, NW]`` holds."""
        grid, block = tuple(mask.shape), tuple(blocks.shape[5:])
        flat_mask = mask.reshape(grid[0], -1)
        rows, cols = flat_mask.nonzero(as_tuple=True)
        counts = flat_mask.sum(1)
        row_ptr = torch.zeros(grid[0] + 1, dtype=torch.int32, device=mask.device)
        row_ptr[1:] = counts.cumsum(0)
        values = blocks.reshape(grid[0], -1, *block)[rows, cols]
        shape = tuple(g * b for g, b in zip(grid, block))
        return cls(shape, block, values, row_ptr, cols.to(torch.int32))

    @classmethod
    def from_dense(cls, weight, block_shape, threshold=None, density=None):
        """The blocks of the dense ``weight [Cout, Cin/g, kd, kh, kw]`` to keep, chosen by
        Frobenius norm: those with norm > ``threshold``, or the ``density`` fraction (in (0, 1])
        of all blocks with the largest norms (``round(density · blocks)``, at least one; ties
        go to the lower block index); with neither, every block that is not all zero. A
        threshold may keep no block at all. The stored values are copies of ``weight``'s."""
        check_tensor("weight", weight, (5,))
        block_shape = five_ints("block_shape", block_shape)
        _check_block_shape(tuple(weight.shape), block_shape)
        grid = tuple(n // b for n, b in zip(weight.shape, block_shape))
        blocks = weight_blocks(weight, block_shape)
        flat = blocks.reshape(*grid, -1)
        mask = _select(flat.detach().norm(dim=-1), (flat != 0).any(-1), threshold, density,
                       math.prod(grid))
        return cls._from_mask(blocks, mask)

    @classmethod
    def from_coo(cls, coo, block_shape):
        """The weight whose stored blocks are those of ``coo`` (a 5-D ``torch.sparse_coo_tensor``
        ``[Cout, Cin/g, kd, kh, kw]`` of a floating dtype) that contain a specified non-zero;
        ``to_dense()`` equals ``coo.to_dense()``."""
        if not isinstance(coo, torch.Tensor):
            raise TypeError(f"coo: expected a torch.sparse_coo_tensor, got {type(coo).__name__}")
        check_tensor("coo", coo, layout=torch.sparse_coo)
        if coo.dim() != 5 or coo.sparse_dim() != 5:
            raise ValueError(f"coo: expected a 5-D sparse tensor [Cout, Cin/g, kd, kh, kw] with 5 "
                             f"sparse dims, got shape {tuple(coo.shape)} with {coo.sparse_dim()} "
                             f"sparse dims")
        shape = tuple(coo.shape)
        block_shape = five_ints("block_shape", block_shape)
        _check_block_shape(shape, block_shape)
        coo = coo.coalesce()
        idx, vals = coo.indices(), coo.values()
        keep = vals != 0
        idx, vals = idx[:, keep], vals[keep]
        b = torch.tensor(block_shape, device=idx.device)[:, None]
        grid = [n // s for n, s in zip(shape, block_shape)]
        outer, inner = idx // b, idx % b
        key, off = outer[0], inner[0]
        for axis in range(1, 5):
            key = key * grid[axis] + outer[axis]
            off = off * block_shape[axis] + inner[axis]
        stored, which = torch.unique(key, sorted=True, return_inverse=True)
        values = vals.new_zeros(stored.shape[0], math.prod(block_shape))
        values[which, off] = vals
        row_ptr = torch.zeros(grid[0] + 1, dtype=torch.int32, device=idx.device)
        total = math.prod(grid[1:])
        row_ptr[1:] = torch.bincount(stored // total, minlength=grid[0]).cumsum(0)
        return cls(shape, block_shape, values.view(-1, *block_shape), row_ptr,
                   (stored % total).to(torch.int32))

    def with_values(self, values) -> "BlockSparseWeight":
        """The same pattern storing ``values [nnz, bo, bi, bd, bh, bw]`` instead (e.g. a tensor
        that requires grad, or an optimizer's update); the pattern is not checked again."""
        self._check_values(values)
        if values.shape[0] != self.nnz or values.device != self.device:
            raise ValueError(f"values: expected {self.nnz} blocks on {self.device} (the "
                             f"pattern's), got {values.shape[0]} on {values.device}")
        weight = object.__new__(BlockSparseWeight)
        for name, value in (("shape", self.shape), ("block_shape", self.block_shape),
                            ("values", values), ("row_ptr", self.row_ptr), ("col", self.col)):
            object.__setattr__(weight, name, value)
        return weight

    def with_mask(self, block_mask) -> "BlockSparseWeight":
        """A new weight storing exactly the blocks where ``block_mask`` (bool ``[NO, NI, ND, NH,
        NW]``) holds: the current values where a block is stored, zeros for newly enabled ones
        (differentiable in ``values``)."""
        if not isinstance(block_mask, torch.Tensor):
            raise TypeError(f"block_mask: expected a bool tensor, got {type(block_mask).__name__}")
        if block_mask.dtype != torch.bool:
            raise TypeError(f"block_mask: expected a bool tensor, got {block_mask.dtype}")
        if tuple(block_mask.shape) != self.grid:
            raise ValueError(f"block_mask: expected shape {self.grid} (blocks per dim, "
                             f"block_shape {self.block_shape} of shape {self.shape}), got "
                             f"{tuple(block_mask.shape)}")
        mask = block_mask.to(self.device).reshape(-1)
        where = torch.full((mask.numel(),), -1, dtype=torch.long, device=self.device)
        where[self._keys()] = torch.arange(self.nnz, device=self.device)
        keys = mask.nonzero().flatten()
        source = where[keys]
        if self.nnz:
            old = self.values[source.clamp_min(0)]
            values = torch.where((source >= 0).view(-1, 1, 1, 1, 1, 1), old, 0)
        else:
            values = self.values.new_zeros(keys.shape[0], *self.block_shape)
        total = math.prod(self.grid[1:])
        row_ptr = torch.zeros(self.grid[0] + 1, dtype=torch.int32, device=self.device)
        row_ptr[1:] = torch.bincount(keys // total, minlength=self.grid[0]).cumsum(0)
        return BlockSparseWeight(self.shape, self.block_shape, values, row_ptr,
                                 (keys % total).to(torch.int32))

    def prune(self, density=None, threshold=None) -> "BlockSparseWeight":
        """A new weight keeping, among the stored blocks, those with Frobenius norm >
        ``threshold``, or the ones with the largest norms up to ``density`` of all blocks
        (``round(density · blocks)``, at least one; all stored ones if fewer); with neither,
        those that are not all zero."""
        norms = torch.zeros(math.prod(self.grid), dtype=self.dtype, device=self.device)
        nonzero = torch.zeros(norms.shape, dtype=torch.bool, device=self.device)
        flat = self.values.detach().reshape(self.nnz, -1)
        keys = self._keys()
        norms[keys] = flat.norm(dim=1)
        nonzero[keys] = (flat != 0).any(1)
        stored = self.block_mask().reshape(-1)
        mask = _select(norms, nonzero, threshold, density, norms.numel(), stored)
        return self.with_mask(mask.view(self.grid))


def weight_blocks(weight, block_shape):
    """A view of the dense ``weight`` as its blocks ``[NO, NI, ND, NH, NW, bo, bi, bd, bh, bw]``."""
    grid = [n // b for n, b in zip(weight.shape, block_shape)]
    bo, bi, bd, bh, bw = block_shape
    blocks = weight.reshape(grid[0], bo, grid[1], bi, grid[2], bd, grid[3], bh, grid[4], bw)
    return blocks.permute(0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


def block_keys(row_ptr, col, grid):
    """``row·(NI·ND·NH·NW) + col`` of every stored block (int64, ascending)."""
    rows = torch.repeat_interleave(torch.arange(grid[0], device=col.device),
                                   row_ptr.long().diff(), output_size=col.shape[0])
    return rows * math.prod(grid[1:]) + col.long()


def dense_weight(values, row_ptr, col, shape, block_shape):
    """The dense weight of stored blocks ``values`` in the pattern ``row_ptr``/``col``."""
    grid = [n // b for n, b in zip(shape, block_shape)]
    vol = math.prod(block_shape)
    flat = values.new_zeros(math.prod(grid), vol)
    flat = flat.index_copy(0, block_keys(row_ptr, col, grid), values.reshape(-1, vol))
    blocks = flat.view(*grid, *block_shape)
    return blocks.permute(0, 5, 1, 6, 2, 7, 3, 8, 4, 9).reshape(shape)


def _check_block_shape(shape, block_shape):
    for i, (n, b, what) in enumerate(zip(shape, block_shape, _DIMS)):
        if n % b:
            raise ValueError(f"block_shape: block_shape[{i}] = {b} does not divide the {what} "
                             f"{n} (shape[{i}]) of shape {shape}")


def check_block_shape(shape, block_shape, groups=1):
    """``block_shape`` as a tuple of 5 ints, checked to fit a weight of ``shape`` (Cout,
    Cin/g, kd, kh, kw) used with ``groups``: each side divides its dim, and a block row of
    ``bo`` output channels lies in one group unless the weight is depthwise (``Cin/g == 1``)."""
    block_shape = five_ints("block_shape", block_shape)
    _check_block_shape(tuple(shape), block_shape)
    cout, cin_g, bo = shape[0], shape[1], block_shape[0]
    if cin_g > 1 and (cout // groups) % bo:
        raise ValueError(f"block_shape: with groups={groups} a block row of bo = {bo} output "
                         f"channels must lie in one group of {cout // groups} (out_channels / "
                         f"groups), got block_shape {block_shape}")
    return block_shape


def check_threshold(threshold):
    if isinstance(threshold, bool) or not isinstance(threshold, Real):
        raise TypeError(f"threshold: expected a non-negative number, got {threshold!r} "
                        f"({type(threshold).__name__})")
    if not threshold >= 0:
        raise ValueError(f"threshold: expected a non-negative number, got {threshold!r}")


def block_count(density, total):
    """How many of ``total`` blocks a ``density`` in (0, 1] keeps: ``round(density · total)``,
    at least one."""
    if isinstance(density, bool) or not isinstance(density, Real):
        raise TypeError(f"density: expected a number in (0, 1], got {density!r} "
                        f"({type(density).__name__})")
    if not 0 < density <= 1:
        raise ValueError(f"density: expected a number in (0, 1], got {density!r}")
    return max(1, round(density * total))


def _select(norms, nonzero, threshold, density, total, stored=None):
    """Which blocks to keep (bool, ``norms``' shape): see ``BlockSparseWeight.from_dense``;
    only among ``stored`` when given."""
    if threshold is not None and density is not None:
        raise ValueError(f"threshold, density: expected at most one of them, got "
                         f"threshold={threshold!r} and density={density!r}")
    candidates = torch.ones_like(nonzero) if stored is None else stored.view(nonzero.shape)
    if threshold is not None:
        check_threshold(threshold)
        return (norms > threshold) & candidates
    if density is not None:
        count = block_count(density, total)
        score = torch.where(candidates, norms.double(), -1.0).flatten()
        order = torch.sort(score, descending=True, stable=True).indices[:count]
        mask = torch.zeros(score.shape, dtype=torch.bool, device=norms.device)
        mask[order] = True
        return mask.view(norms.shape) & candidates
    return nonzero & candidates


def stored_blocks(grad_weight, row_ptr, col, block_shape):
    """The stored blocks' part of a dense weight (gradient): ``[nnz, bo, bi, bd, bh, bw]``."""
    grid = [n // b for n, b in zip(grad_weight.shape, block_shape)]
    blocks = weight_blocks(grad_weight, block_shape).reshape(-1, *block_shape)
    return blocks[block_keys(row_ptr, col, grid)]
