"""Block-sparse convolution: ``lk3d.BlockSparseWeight``, ``lk3d.block_sparse_conv3d`` and the
``lk3d::block_sparse_conv3d`` ops.

A block-sparse weight stands for a dense weight ``[Cout, Cin/g, kd, kh, kw]`` cut into blocks of
``block_shape = (bo, bi, bd, bh, bw)``, of which only some are stored (CSR over output-channel
block rows)::

    values   [nnz, bo, bi, bd, bh, bw]   the stored blocks
    row_ptr  int32 [NO + 1]              NO = Cout // bo; row r holds row_ptr[r]:row_ptr[r+1]
    col      int32 [nnz]                 flat block index ((ci·ND + db)·NH + hb)·NW + wb over
                                         (NI, ND, NH, NW) = (Cin/g / bi, kd / bd, kh / bh, kw / bw),
                                         strictly ascending within each row

    dense[r·bo:(r+1)·bo, ci·bi:(ci+1)·bi, db·bd:.., hb·bh:.., wb·bw:..] = values[k]

Layout: NCDHW or channels_last_3d input (the output keeps the input's layout), batched or
unbatched. Supported: everything ``lk3d.conv3d`` takes (stride, dilation, padding as ints,
3-tuples, ``"same"`` with even kernels, ``"valid"``; groups, depthwise with a channel
multiplier), with exactly ``F.conv3d(input, weight.to_dense(), bias, ...)``'s result. With
groups > 1 and ``Cin/g > 1`` a block row may not span two groups (``(Cout/g) % bo == 0``); a
depthwise weight (``Cin/g == 1``) takes any ``bo`` dividing ``Cout``.

Where it runs: the Triton kernels of ``lk3d.kernels.block_sparse`` when they are there and can
serve the tensors (``_forward``, ``_grad_input``, ``_grad_values``), else the torch path, by one
of two routes with the same result, whichever a cost model says is cheaper (``explain`` tells
which; ``ROUTE`` forces one): the dense route runs the dense convolution of ``to_dense()`` with
lk3d.conv3d's aten or FFT algorithm (oneDNN's dense kernels beat per-block torch products on
small channel blocks at all but low densities), the sparse route
(``block_sparse_conv3d_torch``) works in proportion to the stored blocks: the input is padded
once; for every kernel tap covered by a stored block, the stored blocks at that tap gather their
input-channel blocks from the strided, shifted view of the padded input and multiply them in one
batched product, which is added into their output block rows (bricks of several taps run as one
grouped ``F.conv3d``). Its cost is ``nnz·bo·bi·bd·bh·bw`` multiply-adds per output voxel
(``block_sparse_conv3d_macs``), the dense cost times the block density; the backward passes
(grad-input, the transposed sum; grad-values, per tap products of output-gradient blocks and
shifted input blocks) cost the same each. The pattern (``row_ptr``, ``col``) is fixed within a
step: it gets no gradient. Double backward works on every path: the backward op's own autograd
is written with the forward and backward ops (see "Double backward" below).

Non-finite values: in ``F.conv3d(input, weight.to_dense())`` a NaN or Inf of the input meets the
zeros of the blocks that are not stored, and ``Inf · 0`` is NaN; the kernels and the sparse route
skip those blocks, so they would leave finite, or infinite, values where the dense convolution has
NaN (likewise for a NaN or Inf of the output gradient in grad-input). A forward whose input or
stored values, or a grad-input whose output gradient or stored values, are not all finite
(``lk3d._algos.finite``: one sum each) therefore runs the dense convolution of ``to_dense()`` by
aten, with F.conv3d's NaN/Inf placement. Grad-values needs no such step: every route sums the
same products there.
"""
import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import List, Optional

import torch
import torch.nn.functional as F

from lk3d import _algos
from lk3d._spec import (Conv3dSpec, _triple, batched, check_same, check_tensor, empty,
                        geometry, out_size, positive_int)
from lk3d.kernels import memory_format

try:
    from lk3d import _block_sparse_launch as _kernels
except ImportError:  # no Triton here, or the kernels are not written yet: the torch path serves
    _kernels = None

__all__ = ["BlockSparseWeight", "block_sparse_conv3d", "block_sparse_conv3d_torch",
           "block_sparse_conv3d_macs", "check_block_sparse_conv3d"]

# Set to False to run the torch path even where the Triton kernels could serve.
USE_KERNELS = True

_DIMS = ("out_channels", "in_channels per group", "kernel depth", "kernel height",
         "kernel width")


def _five(name, value):
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
        shape = _five("shape", self.shape)
        block = _five("block_shape", self.block_shape)
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
        return _keys(self.row_ptr, self.col, self.grid)

    def block_mask(self) -> torch.Tensor:
        """A bool tensor ``[NO, NI, ND, NH, NW]``: which blocks are stored."""
        mask = torch.zeros(math.prod(self.grid), dtype=torch.bool, device=self.device)
        mask[self._keys()] = True
        return mask.view(self.grid)

    def to_dense(self) -> torch.Tensor:
        """The dense weight ``shape`` (zeros outside the stored blocks; differentiable in
        ``values``)."""
        return _to_dense(self.values, self.row_ptr, self.col, self.shape, self.block_shape)

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
        block_shape = _five("block_shape", block_shape)
        _check_block_shape(tuple(weight.shape), block_shape)
        grid = tuple(n // b for n, b in zip(weight.shape, block_shape))
        blocks = _blocks(weight, block_shape)
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
        block_shape = _five("block_shape", block_shape)
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


def _blocks(weight, block_shape):
    """A view of the dense ``weight`` as its blocks ``[NO, NI, ND, NH, NW, bo, bi, bd, bh, bw]``."""
    grid = [n // b for n, b in zip(weight.shape, block_shape)]
    bo, bi, bd, bh, bw = block_shape
    blocks = weight.reshape(grid[0], bo, grid[1], bi, grid[2], bd, grid[3], bh, grid[4], bw)
    return blocks.permute(0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


def _keys(row_ptr, col, grid):
    """``row·(NI·ND·NH·NW) + col`` of every stored block (int64, ascending)."""
    rows = torch.repeat_interleave(torch.arange(grid[0], device=col.device),
                                   row_ptr.long().diff(), output_size=col.shape[0])
    return rows * math.prod(grid[1:]) + col.long()


def _to_dense(values, row_ptr, col, shape, block_shape):
    """The dense weight of stored blocks ``values`` in the pattern ``row_ptr``/``col``."""
    grid = [n // b for n, b in zip(shape, block_shape)]
    vol = math.prod(block_shape)
    flat = values.new_zeros(math.prod(grid), vol)
    flat = flat.index_copy(0, _keys(row_ptr, col, grid), values.reshape(-1, vol))
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
    block_shape = _five("block_shape", block_shape)
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


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------

def check_block_sparse_conv3d(input, weight_shape, block_shape, values, bias, stride, padding,
                              dilation, groups) -> Conv3dSpec:
    """Check the arguments of ``block_sparse_conv3d`` (``input`` 5-D, the weight given by its
    parts) and return the normalised spec."""
    check_tensor("input", input, (5,))
    check_same("weight", values, input)
    cout, cin_g = weight_shape[:2]
    if bias is not None:
        check_tensor("bias", bias, (1,))
        check_same("bias", bias, input)
        if tuple(bias.shape) != (cout,):
            raise ValueError(f"bias: expected shape ({cout},) to match weight's output channels, "
                             f"got {tuple(bias.shape)}")
    groups = positive_int("groups", groups)
    stride = _triple("stride", stride, 1)
    dilation = _triple("dilation", dilation, 1)
    cin = input.shape[1]
    if cin % groups:
        raise ValueError(f"groups: expected a divisor of the input's {cin} channels, got {groups}")
    if cout % groups:
        raise ValueError(f"groups: expected a divisor of weight's {cout} output channels, "
                         f"got {groups}")
    if cin_g != cin // groups:
        raise ValueError(f"weight: expected shape[1] = in_channels / groups = {cin} / {groups} = "
                         f"{cin // groups}, got weight of shape {tuple(weight_shape)}")
    check_block_shape(weight_shape, block_shape, groups)
    return geometry(input.shape[2:], tuple(weight_shape[2:]), stride, padding, dilation, groups)


def _check_weight(weight):
    if not isinstance(weight, BlockSparseWeight):
        raise TypeError(f"weight: expected an lk3d.BlockSparseWeight, got "
                        f"{type(weight).__name__}")
    return weight


def _checked(input, weight, bias, stride, padding, dilation, groups):
    """``(input with a batch dim, whether it had none, the normalised spec)`` of a call."""
    x, unbatched = batched(input)
    return x, unbatched, check_block_sparse_conv3d(x, weight.shape, weight.block_shape,
                                                   weight.values, bias, stride, padding,
                                                   dilation, groups)


# ---------------------------------------------------------------------------------------------
# the torch path
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Brick:
    """Some of the stored blocks at one spatial block of the kernel, run as one grouped conv:
    ``origin`` the brick's first tap, ``ks`` the blocks, ``chan`` the input channels they read
    (``bi`` per block, or for a depthwise weight whose rows span groups one per output channel),
    ``ochan`` the output channels they write (``bo`` per block), ``groups`` the conv's groups
    (one per block, or one per output channel)."""
    origin: tuple
    ks: torch.Tensor
    chan: torch.Tensor
    ochan: torch.Tensor
    groups: int


def _bricks(row_ptr, col, weight_shape, block_shape, groups, max_channels=None):
    """The stored blocks grouped by spatial block, in chunks reading at most ``max_channels``
    input channels each (to bound the gathered input)."""
    cout, cin_g = weight_shape[:2]
    bo, bi, bd, bh, bw = block_shape
    grid = [n // b for n, b in zip(weight_shape, block_shape)]
    per_row = math.prod(grid[2:])
    device = col.device
    col = col.long()
    rows = torch.repeat_interleave(torch.arange(grid[0], device=device), row_ptr.long().diff(),
                                   output_size=col.shape[0])
    spatial, ci = col % per_row, col // per_row
    ochan = (rows * bo)[:, None] + torch.arange(bo, device=device)
    cout_g = cout // groups
    per_output = cout_g % bo != 0  # depthwise (cin_g == bi == 1) with rows spanning groups
    if per_output:  # output channel o reads input channel o // cout_g
        chan = ochan // cout_g
    else:  # a block row lies in one group
        chan = ((rows * bo // cout_g) * cin_g + ci * bi)[:, None] + torch.arange(bi, device=device)
    step = max(1, (max_channels or col.shape[0] * chan.shape[1]) // chan.shape[1])
    order = torch.sort(spatial, stable=True).indices
    found, counts = torch.unique_consecutive(spatial[order], return_counts=True)
    out = []
    for s, same in zip(found.tolist(), order.split(counts.tolist())):
        db, rest = divmod(s, grid[3] * grid[4])
        hb, wb = divmod(rest, grid[4])
        for ks in same.split(step):
            m = ks.shape[0]
            out.append(_Brick((db * bd, hb * bh, wb * bw), ks, chan[ks].flatten(),
                              ochan[ks].flatten(), m * bo if per_output else m))
    return out


def _window(origin, block_shape, size, stride, dilation):
    """The part of the padded input that the taps of a brick starting at ``origin`` read: for a
    one-tap brick the strided view of that tap itself."""
    if math.prod(block_shape[2:]) == 1:
        return (slice(None), slice(None)) + tuple(
            slice(o * d, o * d + (n - 1) * s + 1, s)
            for o, n, s, d in zip(origin, size, stride, dilation))
    return (slice(None), slice(None)) + tuple(
        slice(o * d, o * d + (n - 1) * s + (b - 1) * d + 1)
        for o, b, n, s, d in zip(origin, block_shape[2:], size, stride, dilation))


# A brick of one tap is a batched matrix product (elementwise for one channel per group),
# cheaper than a 1×1×1 grouped conv call; larger bricks run as grouped convs.

def _one_tap(brick, w, z, transposed=False):
    """``w [m·bo, bi]`` (the blocks of a one-tap brick) applied to ``z [n, m·bi, ...]`` (or its
    transpose to ``z [n, m·bo, ...]``), per block."""
    n, size, m = z.shape[0], z.shape[2:], brick.ks.shape[0]
    if brick.groups == brick.ochan.numel() == brick.chan.numel():  # one channel per group
        return z * w.view(-1, 1, 1, 1)
    w = w.view(m, -1, w.shape[1])
    spec = "mob,nmop->nmbp" if transposed else "mob,nmbp->nmop"
    return torch.einsum(spec, w, z.reshape(n, m, -1, math.prod(size))).reshape(n, -1, *size)


def _one_tap_grad(brick, gys, xs):
    """The gradient ``[m·bo, bi]`` of the blocks of a one-tap brick."""
    if brick.groups == brick.ochan.numel() == brick.chan.numel():
        return (gys * xs).sum((0, 2, 3, 4)).view(-1, 1)
    n, m = gys.shape[0], brick.ks.shape[0]
    g = torch.einsum("nmop,nmbp->mob", gys.reshape(n, m, -1, gys[0, 0].numel()),
                     xs.reshape(n, m, -1, xs[0, 0].numel()))
    return g.reshape(-1, g.shape[2])


def _acc_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _pad(x, padding):
    d_l, h_l, w_l, d_r, h_r, w_r = padding
    return F.pad(x, (w_l, w_r, h_l, h_r, d_l, d_r))


# Input elements one grouped conv of the torch path may gather (bounds its working memory).
_GATHER_LIMIT = 1 << 24


def _plan(input, padding, row_ptr, col, weight_shape, block_shape, groups):
    spatial = [s + l + r for s, l, r in zip(input.shape[2:], padding[:3], padding[3:])]
    per_channel = max(1, input.shape[0] * math.prod(spatial))
    return _bricks(row_ptr, col, weight_shape, block_shape, groups,
                   max(1, _GATHER_LIMIT // per_channel))


def block_sparse_conv3d_torch(input, values, row_ptr, col, bias, weight_shape, block_shape,
                              stride, padding, dilation, groups):
    """The torch path's sparse route of ``lk3d::block_sparse_conv3d`` (arguments as the op's;
    ``padding`` six ints ``(d_l, h_l, w_l, d_r, h_r, w_r)``), computed in float32 for half
    dtypes."""
    acc = _acc_dtype(input.dtype)
    size = out_size(input.shape[2:], weight_shape[2:], stride, padding, dilation)
    out = input.new_zeros(input.shape[0], weight_shape[0], *size, dtype=acc)
    xp = _pad(input.to(acc), padding)
    vals = values.to(acc)
    one_tap = math.prod(block_shape[2:]) == 1
    for brick in _plan(input, padding, row_ptr, col, weight_shape, block_shape, groups):
        xs = xp[_window(brick.origin, block_shape, size, stride, dilation)]
        xs = xs.index_select(1, brick.chan)
        w = vals[brick.ks].flatten(0, 1)
        if one_tap:
            y = _one_tap(brick, w.flatten(1), xs)
        else:
            y = F.conv3d(xs, w, None, stride, 0, dilation, brick.groups)
        out.index_add_(1, brick.ochan, y)
    if bias is not None:
        out += bias.to(acc).view(-1, 1, 1, 1)
    return out


def block_sparse_conv3d_torch_backward(grad, input, values, row_ptr, col, weight_shape,
                                       block_shape, stride, padding, dilation, groups,
                                       need_input=True, need_values=True):
    """``(grad_input, grad_values)`` of ``block_sparse_conv3d_torch`` (None where not needed);
    the bias gradient is ``grad.sum((0, 2, 3, 4))``."""
    acc = _acc_dtype(input.dtype)
    size = tuple(grad.shape[2:])
    gy = grad.to(acc)
    vals = values.to(acc)
    xp = _pad(input.to(acc), padding) if need_values else None
    gxp = _pad(input.new_zeros(input.shape, dtype=acc), padding) if need_input else None
    gv = torch.zeros(values.shape, dtype=acc, device=values.device) if need_values else None
    one_tap = math.prod(block_shape[2:]) == 1
    for brick in _plan(input, padding, row_ptr, col, weight_shape, block_shape, groups):
        window = _window(brick.origin, block_shape, size, stride, dilation)
        w = vals[brick.ks].flatten(0, 1)
        gys = gy.index_select(1, brick.ochan)
        if need_input:
            if one_tap:
                gxs = _one_tap(brick, w.flatten(1), gys, transposed=True)
            else:
                gxs = F.conv_transpose3d(gys, w, None, stride, 0, 0, brick.groups, dilation)
            gxp[window].index_add_(1, brick.chan, gxs)
        if need_values:
            xs = xp[window].index_select(1, brick.chan)
            if one_tap:
                gw = _one_tap_grad(brick, gys, xs)
            else:
                gw = torch.ops.aten.convolution_backward(
                    gys, xs, w, None, stride, [0, 0, 0], dilation, False, [0, 0, 0],
                    brick.groups, [False, True, False])[1]
            gv[brick.ks] = gw.reshape(-1, *values.shape[1:])
    gx = None
    if need_input:
        d_l, h_l, w_l = padding[:3]
        D, H, W = input.shape[2:]
        gx = gxp[:, :, d_l:d_l + D, h_l:h_l + H, w_l:w_l + W]
    return gx, gv


def block_sparse_conv3d_macs(input, weight, stride=1, padding=0, dilation=1, groups=1) -> int:
    """Multiply-adds the torch path's sparse route performs for ``block_sparse_conv3d(input,
    weight, None, stride, padding, dilation, groups)``: ``bo·bi·bd·bh·bw`` per stored block and
    output voxel, counted over the grouped convs it runs. Its grad-input and grad-values passes
    perform as many each."""
    x, _, spec = _checked(input, _check_weight(weight), None, stride, padding, dilation, groups)
    voxels = x.shape[0] * math.prod(spec.out_size)
    taps = math.prod(weight.block_shape[2:])
    total = 0
    for brick in _plan(x, spec.padding, weight.row_ptr, weight.col, weight.shape,
                       weight.block_shape, spec.groups):
        # One grouped conv: out channels × (in channels per group) × taps per output voxel.
        total += brick.ochan.numel() * (brick.chan.numel() // brick.groups) * taps * voxels
    return total


# ---------------------------------------------------------------------------------------------
# the torch path's route: the stored blocks, or the dense convolution of the same kernel
# ---------------------------------------------------------------------------------------------

# Where the Triton kernels do not serve, a call runs one of two routes with the same result:
# "sparse" (block_sparse_conv3d_torch, work ∝ the stored blocks) or "dense" (the dense
# convolution of ``to_dense()`` by lk3d.conv3d's aten or FFT algorithm, whichever its cost
# model prefers). Small blocks cost the sparse route far more per multiply-add than oneDNN's
# dense kernels (gathers and scatters of channel slices, small batched products), so it wins
# only below some density; the cost model below picks the cheaper. Its constants were fitted
# (non-negative least squares on relative error) to 35 measured times of the sparse route on a
# 2-core Intel Xeon (torch 2.13; channel blocks 8x8 to 32x32 per tap, 2³/3³/4³ bricks, depthwise
# bricks; 5% to 100% density), the same machine as lk3d.conv3d's CPU model: per element gathered
# or scattered, per multiply-add of a one-tap brick (batched small products; the fit puts its
# cost in the gathers), per multiply-add of a brick run as a grouped F.conv3d (oneDNN), and per
# brick. With them the route picked was the faster one in 32 of the 35 cases and within 1.2x
# of it in 34 (the constants fitted earlier on an AMD EPYC misrouted 20 there, by up to 7x).
_MOVE_NS = 1.6
_TAP_MAC_NS = 0.0
_CONV_MAC_NS = 0.023
_BRICK_MS = 0.4

# "auto" (the cost model), or "sparse" / "dense" to force a route (the tests force "sparse").
ROUTE = "auto"


def sparse_route_ms(input, row_ptr, col, weight_shape, block_shape, stride, padding, dilation,
                    groups) -> float:
    """Modelled milliseconds of the sparse route (``block_sparse_conv3d_torch``, a forward):
    per stored block its gathered input channels and scattered output channels (twice for an
    elementwise depthwise tap) and its multiply-adds; per occupied spatial block one brick."""
    size = out_size(input.shape[2:], weight_shape[2:], stride, padding, dilation)
    n, nnz = input.shape[0], col.shape[0]
    out_vox = n * math.prod(size)
    bo, bi = block_shape[:2]
    taps = math.prod(block_shape[2:])
    one_tap = taps == 1
    window = out_vox if one_tap else n * math.prod(
        (o - 1) * s + (b - 1) * d + 1 for o, s, b, d in zip(size, stride, block_shape[2:],
                                                             dilation))
    cout_g = weight_shape[0] // groups
    per_output = cout_g % bo != 0  # as in _bricks: one input channel per output channel
    elementwise = one_tap and (per_output or bo == bi == 1)
    gathered = bo if per_output else bi
    moved = nnz * (gathered * window + bo * out_vox * (2 if elementwise else 1))
    macs = nnz * bo * (1 if per_output else bi) * taps * out_vox
    spatial = math.prod(k // b for k, b in zip(weight_shape[2:], block_shape[2:]))
    bricks = torch.unique(col.long() % spatial).numel() if nnz else 0
    scale = 2 / max(1, torch.get_num_threads())
    ns = moved * _MOVE_NS + macs * scale * (_TAP_MAC_NS if one_tap else _CONV_MAC_NS)
    return ns * 1e-6 + _BRICK_MS * bricks


def _dense_algo(input, weight_shape, stride, padding, dilation, groups):
    """``(algo, ms)``: lk3d.conv3d's modelled-fastest non-Triton algorithm for the dense
    convolution of the same kernel."""
    times = {a: _algos.model_ms(a, list(input.shape), list(weight_shape), stride, padding,
                                dilation, groups, input.dtype, input.device)
             for a in _algos.candidates(input) if a != "tiled"}
    algo = min(times, key=times.get)
    return algo, times[algo]


def _route(input, row_ptr, col, weight_shape, block_shape, stride, padding, dilation, groups):
    """``(route, dense algo or None, modelled ms per route)`` of a torch-path call (see
    ``ROUTE``)."""
    if ROUTE not in ("auto", "sparse", "dense"):
        raise ValueError(f"lk3d.block_sparse.ROUTE: expected 'auto', 'sparse' or 'dense', got "
                         f"{ROUTE!r}")
    times, algo = {}, None
    if ROUTE != "dense":
        times["sparse"] = sparse_route_ms(input, row_ptr, col, weight_shape, block_shape, stride,
                                          padding, dilation, groups)
    if ROUTE != "sparse":
        algo, times["dense"] = _dense_algo(input, weight_shape, stride, padding, dilation,
                                           groups)
    route = min(times, key=times.get)
    return route, algo if route == "dense" else None, times


def explain(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> dict:
    """How ``block_sparse_conv3d(input, weight, ...)`` would run here: ``{"path": "kernels"}``
    where the Triton kernels serve, else ``{"path": "torch", "route": "sparse" | "dense",
    "algo": the dense route's algorithm or None, "times_ms": modelled ms per route}``."""
    x, _, spec = _checked(input, _check_weight(weight), bias, stride, padding, dilation, groups)
    if _launcher("block_sparse_fwd", x) is not None:
        return dict(path="kernels")
    route, algo, times = _route(x, weight.row_ptr, weight.col, weight.shape, weight.block_shape,
                                list(spec.stride), list(spec.padding), list(spec.dilation),
                                spec.groups)
    return dict(path="torch", route=route, algo=algo, times_ms=times)


def _dense_blocks(grad_weight, row_ptr, col, block_shape):
    """The stored blocks' part of a dense weight gradient: ``[nnz, bo, bi, bd, bh, bw]``."""
    grid = [n // b for n, b in zip(grad_weight.shape, block_shape)]
    blocks = _blocks(grad_weight, block_shape).reshape(-1, *block_shape)
    return blocks[_keys(row_ptr, col, grid)]


# ---------------------------------------------------------------------------------------------
# the custom ops
# ---------------------------------------------------------------------------------------------

def _launcher(name, t):
    """The Triton launcher ``name`` of ``lk3d.kernels.block_sparse`` (with its config, through
    ``lk3d._block_sparse_launch``) if it exists and can serve tensors like ``t``, else None."""
    if not USE_KERNELS or _kernels is None or not _algos.kernels_can_run(t):
        return None
    return getattr(_kernels, name, None)


def _forward(input, values, row_ptr, col, bias, weight_shape, block_shape, stride, padding,
             dilation, groups):
    if not _algos.finite(input, values):  # see "Non-finite values" in the module docstring
        w = _to_dense(values, row_ptr, col, weight_shape, block_shape)
        return _algos.aten_forward(input, w, bias, stride, padding, dilation, groups)
    run = _launcher("block_sparse_fwd", input)
    if run is not None:
        return run(input, values, row_ptr, col, weight_shape, block_shape, bias, stride,
                   padding, dilation, groups)
    route, algo, _ = _route(input, row_ptr, col, weight_shape, block_shape, stride,
                                    padding, dilation, groups)
    if route == "dense":
        w = _to_dense(values, row_ptr, col, weight_shape, block_shape)
        return _algos.FORWARD[algo](input, w, bias, stride, padding, dilation, groups)
    return block_sparse_conv3d_torch(input, values, row_ptr, col, bias, weight_shape,
                                     block_shape, stride, padding, dilation, groups)


def _grad_input(grad, values, row_ptr, col, weight_shape, block_shape, input, stride, padding,
                dilation, groups):
    if not _algos.finite(grad, values):
        w = _to_dense(values, row_ptr, col, weight_shape, block_shape)
        return _algos.aten_grad_input(grad, w, list(input.shape), stride, padding, dilation,
                                      groups)
    run = _launcher("block_sparse_bwd_input", grad)
    if run is not None:
        return run(grad, values, row_ptr, col, weight_shape, block_shape, list(input.shape),
                   stride, padding, dilation, groups)
    route, algo, _ = _route(input, row_ptr, col, weight_shape, block_shape, stride,
                                    padding, dilation, groups)
    if route == "dense":
        w = _to_dense(values, row_ptr, col, weight_shape, block_shape)
        return _algos.GRAD_INPUT[algo](grad, w, list(input.shape), stride, padding, dilation,
                                       groups)
    return block_sparse_conv3d_torch_backward(grad, input, values, row_ptr, col, weight_shape,
                                              block_shape, stride, padding, dilation, groups,
                                              need_values=False)[0]


def _grad_values(grad, input, values, row_ptr, col, weight_shape, block_shape, stride, padding,
                 dilation, groups):
    run = _launcher("block_sparse_bwd_values", grad)
    if run is not None:
        return run(grad, input, values, row_ptr, col, weight_shape, block_shape, stride, padding,
                   dilation, groups)
    route, algo, _ = _route(input, row_ptr, col, weight_shape, block_shape, stride,
                                    padding, dilation, groups)
    if route == "dense":
        gw = _algos.GRAD_WEIGHT[algo](grad, input, list(weight_shape), stride, padding, dilation,
                                      groups)
        return _dense_blocks(gw, row_ptr, col, block_shape)
    return block_sparse_conv3d_torch_backward(grad, input, values, row_ptr, col, weight_shape,
                                              block_shape, stride, padding, dilation, groups,
                                              need_input=False)[1]


@torch.library.custom_op("lk3d::block_sparse_conv3d", mutates_args=())
def block_sparse_conv3d_op(input: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor,
                           col: torch.Tensor, bias: Optional[torch.Tensor],
                           weight_shape: List[int], block_shape: List[int], stride: List[int],
                           padding: List[int], dilation: List[int],
                           groups: int) -> torch.Tensor:
    size = out_size(input.shape[2:], weight_shape[2:], stride, padding, dilation)
    mf = memory_format(input)
    if input.shape[0] == 0:
        return empty((0, weight_shape[0], *size), input, mf)
    y = _forward(input, values, row_ptr, col, bias, list(weight_shape), list(block_shape),
                 list(stride), list(padding), list(dilation), groups)
    return y.to(input.dtype).contiguous(memory_format=mf)


@block_sparse_conv3d_op.register_fake
def _(input, values, row_ptr, col, bias, weight_shape, block_shape, stride, padding, dilation,
      groups):
    size = out_size(input.shape[2:], weight_shape[2:], stride, padding, dilation)
    return empty((input.shape[0], weight_shape[0], *size), input, memory_format(input))


@torch.library.custom_op("lk3d::block_sparse_conv3d_backward", mutates_args=())
def block_sparse_conv3d_backward_op(grad: torch.Tensor, input: torch.Tensor,
                                    values: torch.Tensor, row_ptr: torch.Tensor,
                                    col: torch.Tensor, weight_shape: List[int],
                                    block_shape: List[int], stride: List[int],
                                    padding: List[int], dilation: List[int], groups: int,
                                    output_mask: List[bool]) -> List[torch.Tensor]:
    """``[grad_input, grad_values]``; an entry whose ``output_mask`` is False is zeros."""
    mf = memory_format(input)
    gx = gv = None
    if grad.numel() and values.shape[0]:
        args = (list(weight_shape), list(block_shape), list(stride), list(padding),
                list(dilation), groups)
        if output_mask[0]:
            gx = _grad_input(grad, values, row_ptr, col, args[0], args[1], input, *args[2:])
        if output_mask[1]:
            gv = _grad_values(grad, input, values, row_ptr, col, *args)
    gx = torch.zeros_like(input, memory_format=mf) if gx is None else gx
    gv = torch.zeros_like(values) if gv is None else gv
    return [gx.to(input.dtype).contiguous(memory_format=mf), gv.to(values.dtype).contiguous()]


@block_sparse_conv3d_backward_op.register_fake
def _(grad, input, values, row_ptr, col, weight_shape, block_shape, stride, padding, dilation,
      groups, output_mask):
    return [empty(input.shape, input, memory_format(input)), empty(values.shape, values)]


def _setup_context(ctx, inputs, output):
    (input, values, row_ptr, col, bias, weight_shape, block_shape, stride, padding, dilation,
     groups) = inputs
    ctx.save_for_backward(input, values, row_ptr, col)
    ctx.has_bias = bias is not None
    ctx.args = (list(weight_shape), list(block_shape), list(stride), list(padding),
                list(dilation), groups)


def _backward(ctx, grad):
    input, values, row_ptr, col = ctx.saved_tensors
    needs = ctx.needs_input_grad
    gx = gv = gb = None
    if needs[0] or needs[1]:
        gx, gv = block_sparse_conv3d_backward_op(grad, input, values, row_ptr, col, *ctx.args,
                                                 [needs[0], needs[1]])
        gx, gv = (gx if needs[0] else None), (gv if needs[1] else None)
    if ctx.has_bias and needs[4]:
        gb = grad.sum(dim=(0, 2, 3, 4))
    return gx, gv, None, None, gb, None, None, None, None, None, None


block_sparse_conv3d_op.register_autograd(_backward, setup_context=_setup_context)


# Double backward. The backward op is the gradient of <grad, conv(x, values)>, linear in grad, x
# and values; cotangents (v_x, v_values) of it give that product's derivative along them,
# <grad, conv(v_x, values) + conv(x, v_values)>: its gradient in grad is that sum, in x the
# grad-input with v_values as the blocks, in values the grad-values with v_x as the input. The
# cotangent of an entry the backward op did not compute (output_mask False: zeros) does not count.

def _setup_context_backward(ctx, inputs, output):
    grad, input, values, row_ptr, col, *args, mask = inputs
    ctx.save_for_backward(grad, input, values, row_ptr, col)
    ctx.args = tuple(list(a) for a in args[:-1]) + (args[-1],)
    ctx.mask = [bool(m) for m in mask]
    ctx.set_materialize_grads(False)  # an unused gradient need not cost a convolution


def _backward_backward(ctx, gg):
    grad, x, values, row_ptr, col = ctx.saved_tensors
    v_x, v_values = (g if m else None for g, m in zip(gg, ctx.mask))
    needs = ctx.needs_input_grad
    g_grad = g_x = g_values = None
    if needs[0]:
        terms = [block_sparse_conv3d_op(a, b, row_ptr, col, None, *ctx.args)
                 for a, b in ((v_x, values), (x, v_values)) if a is not None and b is not None]
        g_grad = sum(terms[1:], terms[0]) if terms else None
    if needs[1] and v_values is not None:
        g_x = block_sparse_conv3d_backward_op(grad, x, v_values, row_ptr, col, *ctx.args,
                                              [True, False])[0]
    if needs[2] and v_x is not None:
        g_values = block_sparse_conv3d_backward_op(grad, v_x, values, row_ptr, col, *ctx.args,
                                                   [False, True])[1]
    return g_grad, g_x, g_values, *[None] * 9


block_sparse_conv3d_backward_op.register_autograd(_backward_backward,
                                                  setup_context=_setup_context_backward)


# ---------------------------------------------------------------------------------------------
# the functional
# ---------------------------------------------------------------------------------------------

def _conv(input, shape, block_shape, values, row_ptr, col, bias, stride, padding, dilation,
          groups):
    """``block_sparse_conv3d`` on a weight given by its (already checked) parts."""
    input, unbatched = batched(input)
    spec = check_block_sparse_conv3d(input, shape, block_shape, values, bias, stride, padding,
                                     dilation, groups)
    out = block_sparse_conv3d_op(input, values, row_ptr, col, bias, list(shape),
                                 list(block_shape), list(spec.stride), spec.padding,
                                 list(spec.dilation), spec.groups)
    return out.squeeze(0) if unbatched else out


def block_sparse_conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """3D convolution with a block-sparse weight: ``F.conv3d(input, weight.to_dense(), bias,
    stride, padding, dilation, groups)`` at a cost proportional to the stored blocks.

    ``input`` is ``[N, Cin, D, H, W]`` or unbatched ``[Cin, D, H, W]``; ``weight`` an
    ``lk3d.BlockSparseWeight`` of the input's dtype and device with ``shape[1] = Cin / groups``;
    ``stride``, ``dilation`` and ``padding`` as ``lk3d.conv3d`` takes them. Differentiable in the
    input, ``weight.values`` and the bias, twice and more (double backward); one
    ``lk3d::block_sparse_conv3d`` node under ``torch.compile``.
    """
    _check_weight(weight)
    return _conv(input, weight.shape, weight.block_shape, weight.values, weight.row_ptr,
                 weight.col, bias, stride, padding, dilation, groups)
