"""``lk3d.nn``: a drop-in ``Conv3d`` module, low-rank ``CPConv3d`` and ``TuckerConv3d``, and
``convert``, which swaps them into a model.

    conv = lk3d.nn.Conv3d(32, 32, 7, padding=3, groups=32)       # like torch.nn.Conv3d
    model = lk3d.nn.convert(model, min_kernel_size=5)            # swap the large nn.Conv3d
    model = lk3d.nn.convert(model, to="cp", rank=16)             # ... for rank-16 CP convs
    model = lk3d.nn.convert(model, to="block_sparse", block_shape=(4, 4, 1, 1, 1), density=0.25)

``Conv3d`` subclasses ``torch.nn.Conv3d``: same constructor, initialisation, parameters
(``weight``, ``bias``), ``state_dict`` keys and ``padding_mode`` handling, and
``isinstance(m, torch.nn.Conv3d)`` holds. Only the convolution itself changes: it runs
``lk3d.conv3d``, so one converted module is one ``lk3d::conv3d`` node under ``torch.compile``
(plus an ``F.pad`` for the ``reflect``/``replicate``/``circular`` padding modes, as in torch).

``CPConv3d`` holds a rank-R CP kernel (``U_out``, ``U_in``, ``A``, ``B``, ``C``: see
``lk3d.CPFactors``) and runs ``lk3d.cp_conv3d``; ``TuckerConv3d`` holds a Tucker-2 kernel and runs
a 1×1×1 conv, a reduced dense conv and a 1×1×1 conv through ``lk3d.conv3d``. Both take
``nn.Conv3d``'s arguments (groups = 1), are initialised so that their output has the variance of
``nn.Conv3d``'s default initialisation, and are built from a trained conv by ``from_conv``
(``lk3d.decompose``); ``CPConv3d.from_conv`` and ``convert(to="cp")`` warn where the CP form is
more than ``CP_MAX_REL_ERROR`` (0.3, relative) off the weight.

``BlockSparseConv3d`` holds a block-sparse kernel (``values``, a parameter, and its pattern
``row_ptr``/``col``, buffers: see ``lk3d.BlockSparseWeight``) and runs
``lk3d.block_sparse_conv3d``; it takes every ``nn.Conv3d`` argument (groups included), is built
from a trained conv by ``from_conv`` (pruning its blocks by norm), and changes its pattern during
training with ``prune`` and ``set_mask`` (dynamic sparsity). ``convert`` takes ``to="dense"``,
``to="cp"`` and ``to="block_sparse"``.
"""
import copy
import math
import warnings
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from torch import nn

from lk3d import decompose
from lk3d._spec import check_padding, pad_order, padding_sides, positive_int, triple
from lk3d.block_sparse import block_sparse_conv3d_parts
from lk3d.block_sparse_weight import (BlockSparseWeight, block_count, check_block_shape,
                                      check_threshold, five_ints)
from lk3d.cp import cp_conv3d
from lk3d.cp_factors import CPFactors
from lk3d.functional import conv3d

__all__ = ["Conv3d", "CPConv3d", "TuckerConv3d", "BlockSparseConv3d", "convert"]

_CONVERT_TO = ("dense", "cp", "block_sparse")
# CPConv3d.from_conv and convert(to="cp") warn (UserWarning) when the CP decomposition's relative
# error of the weight, ||W - W_cp|| / ||W||, passes this: the layer then computes something else
# than the conv it replaces (a random 7³ weight at rank 1 is ~0.98 off). Their ``max_rel_error``
# argument overrides it per call; math.inf silences the warning.
CP_MAX_REL_ERROR = 0.3
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class Conv3d(nn.Conv3d):
    """``torch.nn.Conv3d`` running on ``lk3d.conv3d``; see ``torch.nn.Conv3d`` for the arguments.

    Its ``repr`` reads ``lk3d.nn.Conv3d(...)`` so a printed model shows which convolutions were
    converted; everything else (arguments, state, initialisation) is ``torch.nn.Conv3d``'s.
    """

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            # As torch does: pad explicitly (also for padding="same"), then convolve unpadded.
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv3d(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv3d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _get_name(self):
        return "lk3d.nn.Conv3d"


def _uniform_(t, var):
    """Fill ``t`` from U(-b, b) with variance ``var`` (b = sqrt(3·var))."""
    bound = math.sqrt(3.0 * var)
    return nn.init.uniform_(t, -bound, bound)


class _FactoredConv3d(nn.Module):
    """What ``CPConv3d`` and ``TuckerConv3d`` share: ``nn.Conv3d``'s configuration (groups = 1),
    checked as torch checks it, the bias and its initialisation, the padding modes."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, bias,
                 padding_mode, factory_kwargs):
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_channels = positive_int("out_channels", out_channels)
        self.kernel_size = triple("kernel_size", kernel_size)
        self.stride = triple("stride", stride)
        self.dilation = triple("dilation", dilation)
        self.padding = check_padding(padding, self.stride)
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode: expected one of {', '.join(map(repr, _PADDING_MODES))}"
                             f", got {padding_mode!r}")
        self.padding_mode = padding_mode
        # F.pad's order (w_l, w_r, h_l, h_r, d_l, d_r), for the non-zero padding modes.
        left, right = padding_sides(self.padding, self.kernel_size, self.dilation)
        self._reversed_padding_repeated_twice = pad_order(left + right)
        if not isinstance(bias, bool):
            raise TypeError(f"bias: expected a bool, got {bias!r} ({type(bias).__name__})")
        self._has_bias = bias

    def _add_bias(self, factory_kwargs):
        """Register ``bias`` (after the factors, so ``parameters()`` ends with it as in torch)."""
        if self._has_bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, **factory_kwargs))
        else:
            self.register_parameter("bias", None)

    @property
    def fan_in(self):
        return self.in_channels * math.prod(self.kernel_size)

    def _reset_bias(self):
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.fan_in)  # nn.Conv3d's
            nn.init.uniform_(self.bias, -bound, bound)

    def _padded(self, input):
        """``(input, padding)`` for the convolution: the input padded explicitly for the
        non-zero padding modes (as torch does), else as it is with the module's padding."""
        if self.padding_mode == "zeros":
            return input, self.padding
        return F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0

    def _copy_conv(self, conv):
        """Take ``conv``'s bias, ``requires_grad`` and training mode (after the factors)."""
        with torch.no_grad():
            if self.bias is not None:
                self.bias.copy_(conv.bias)
                self.bias.requires_grad_(conv.bias.requires_grad)
        for p in self.parameters():
            if p is not self.bias:
                p.requires_grad_(conv.weight.requires_grad)
        self.train(conv.training)
        return self

    def extra_repr(self):
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        s += self._rank_repr()
        if self.stride != (1, 1, 1):
            s += f", stride={self.stride}"
        if self.padding != (0, 0, 0):
            s += f", padding={self.padding!r}"
        if self.dilation != (1, 1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s


def _max_rel_error(value):
    """``value`` checked (a non-negative number), or ``CP_MAX_REL_ERROR`` where it is None."""
    if value is None:
        return CP_MAX_REL_ERROR
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"max_rel_error: expected a non-negative number (math.inf: never warn), "
                        f"got {value!r} ({type(value).__name__})")
    if not value >= 0:
        raise ValueError(f"max_rel_error: expected a non-negative number (math.inf: never warn), "
                         f"got {value!r}")
    return float(value)


def _cp_error_text(conv, rank, err, limit):
    return (f"the rank-{rank} CP form of the {tuple(conv.weight.shape)} weight is "
            f"{err:.3g} off it (relative error, above max_rel_error={limit:g}): the layer's "
            f"output will differ from the conv's by about that much. Raise the rank, or pass "
            f"max_rel_error= to accept it")


def _conv_config(conv, rank_name):
    if not isinstance(conv, nn.Conv3d):
        raise TypeError(f"conv: expected a torch.nn.Conv3d, got {type(conv).__name__}")
    if rank_name is not None and conv.groups != 1:
        raise ValueError(f"conv: expected groups=1 (a {rank_name} form of a grouped conv is not "
                         f"supported), got groups={conv.groups}")
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels,
                kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, bias=conv.bias is not None,
                padding_mode=conv.padding_mode, device=conv.weight.device,
                dtype=conv.weight.dtype)


class CPConv3d(_FactoredConv3d):
    """A 3D convolution with a rank-``rank`` CP kernel, running ``lk3d.cp_conv3d``.

    Arguments as ``torch.nn.Conv3d`` (no ``groups``: a CP conv is dense), plus ``rank``.
    Parameters ``U_out [out, R]``, ``U_in [in, R]``, ``A [kd, R]``, ``B [kh, R]``,
    ``C [kw, R]`` and ``bias``; ``factors`` gives them as an ``lk3d.CPFactors``.

    Initialisation: ``nn.Conv3d``'s default (kaiming_uniform with a=sqrt(5)) draws weights of
    variance ``1 / (3·fan_in)``, ``fan_in = in·kd·kh·kw``. A dense element here is a sum of R
    products of five independent zero-mean factor entries, so its variance is
    ``R·Var(U_out)·Var(U_in)·Var(A)·Var(B)·Var(C)``, and distinct elements are uncorrelated, so
    the output variance follows. The factors are uniform with ``Var(U_in) = 1/in``,
    ``Var(A) = 1/kd``, ``Var(B) = 1/kh``, ``Var(C) = 1/kw`` (each stage of the factored sequence
    keeps the variance of what it reads) and ``Var(U_out) = 1/(3·R)``, which gives
    ``1 / (3·fan_in)``. The bias is initialised as ``nn.Conv3d``'s.
    """

    def __init__(self, in_channels, out_channels, kernel_size, rank, stride=1, padding=0,
                 dilation=1, bias=True, padding_mode="zeros", device=None, dtype=None):
        factory_kwargs = dict(device=device, dtype=dtype)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias,
                         padding_mode, factory_kwargs)
        self.rank = positive_int("rank", rank)
        rows = (self.out_channels, self.in_channels, *self.kernel_size)
        for name, n in zip(("U_out", "U_in", "A", "B", "C"), rows):
            setattr(self, name, nn.Parameter(torch.empty(n, self.rank, **factory_kwargs)))
        self._add_bias(factory_kwargs)
        self.reset_parameters()

    def reset_parameters(self):
        _uniform_(self.U_out, 1.0 / (3 * self.rank))
        for name, n in zip(("U_in", "A", "B", "C"), (self.in_channels, *self.kernel_size)):
            _uniform_(getattr(self, name), 1.0 / n)
        self._reset_bias()

    @property
    def factors(self) -> CPFactors:
        return CPFactors(self.U_out, self.U_in, self.A, self.B, self.C)

    def forward(self, input):
        input, padding = self._padded(input)
        return cp_conv3d(input, self.factors, self.bias, self.stride, padding, self.dilation)

    def _rank_repr(self):
        return f", rank={self.rank}"

    @classmethod
    def from_conv(cls, conv, rank, max_rel_error=None, **kwargs):
        """A ``CPConv3d`` approximating ``conv`` (an ``nn.Conv3d`` with groups=1): its weight's
        rank-``rank`` CP decomposition (``lk3d.decompose.cp``, which takes ``kwargs``), its
        bias and configuration, on its device and dtype. The decomposition's component scales
        are spread evenly over the five factors. The relative error of the weight is kept in
        ``decomposition_error`` (a float); where it is above ``max_rel_error`` (default
        ``lk3d.nn.CP_MAX_REL_ERROR``, 0.3; ``math.inf``: never) a ``UserWarning`` says so."""
        limit = _max_rel_error(max_rel_error)
        module = cls(**_conv_config(conv, "CP"), rank=rank)
        factors, err = decompose.cp(conv.weight.detach(), module.rank, **kwargs)
        if err > limit:
            warnings.warn(f"CPConv3d.from_conv: {_cp_error_text(conv, module.rank, err, limit)}",
                          UserWarning, stacklevel=2)
        scale = factors.weights
        sign, mag = scale.sign(), scale.abs() ** (1.0 / 5)
        with torch.no_grad():
            module.U_out.copy_(factors.U_out * (sign * mag))
            for name in ("U_in", "A", "B", "C"):
                getattr(module, name).copy_(getattr(factors, name) * mag)
        module.decomposition_error = err
        return module._copy_conv(conv)


class TuckerConv3d(_FactoredConv3d):
    """A 3D convolution with a Tucker-2 kernel: a 1×1×1 conv ``in -> in_rank``, a dense conv
    ``in_rank -> out_rank`` with the kernel, stride, padding and dilation, and a 1×1×1 conv
    ``out_rank -> out`` with the bias, each through ``lk3d.conv3d``.

    Arguments as ``torch.nn.Conv3d`` (no ``groups``), plus ``ranks``: ``(out_rank, in_rank)`` or
    one int for both. Parameters ``U_in [in, in_rank]``, ``core [out_rank, in_rank, kd, kh, kw]``,
    ``U_out [out, out_rank]``, ``bias``. Initialised as ``CPConv3d``, for the same output
    variance as ``nn.Conv3d``: ``Var(U_in) = 1/in``, ``Var(core) = 1/(in_rank·kd·kh·kw)``,
    ``Var(U_out) = 1/(3·out_rank)``, so a dense element has variance
    ``out_rank·in_rank·Var(U_out)·Var(core)·Var(U_in) = 1 / (3·fan_in)``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, ranks, stride=1, padding=0,
                 dilation=1, bias=True, padding_mode="zeros", device=None, dtype=None):
        factory_kwargs = dict(device=device, dtype=dtype)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias,
                         padding_mode, factory_kwargs)
        self.ranks = decompose.tucker_ranks(ranks, self.out_channels, self.in_channels)
        r_out, r_in = self.ranks
        self.U_in = nn.Parameter(torch.empty(self.in_channels, r_in, **factory_kwargs))
        self.core = nn.Parameter(torch.empty(r_out, r_in, *self.kernel_size, **factory_kwargs))
        self.U_out = nn.Parameter(torch.empty(self.out_channels, r_out, **factory_kwargs))
        self._add_bias(factory_kwargs)
        self.reset_parameters()

    def reset_parameters(self):
        r_out, r_in = self.ranks
        _uniform_(self.U_in, 1.0 / self.in_channels)
        _uniform_(self.core, 1.0 / (r_in * math.prod(self.kernel_size)))
        _uniform_(self.U_out, 1.0 / (3 * r_out))
        self._reset_bias()

    @property
    def factors(self) -> "decompose.TuckerFactors":
        return decompose.TuckerFactors(self.core, self.U_out, self.U_in)

    def forward(self, input):
        # The 1×1×1 conv commutes with every padding mode, so pad the in_rank channels after it.
        h = conv3d(input, self.U_in.t()[..., None, None, None])
        h, padding = self._padded(h)
        h = conv3d(h, self.core, None, self.stride, padding, self.dilation)
        return conv3d(h, self.U_out[..., None, None, None], self.bias)

    def _rank_repr(self):
        return f", ranks={self.ranks}"

    @classmethod
    def from_conv(cls, conv, ranks, **kwargs):
        """A ``TuckerConv3d`` approximating ``conv`` (an ``nn.Conv3d`` with groups=1) by the
        Tucker-2 decomposition of its weight (``lk3d.decompose.tucker``, which takes
        ``kwargs``), with its bias and configuration; the relative error of the weight is kept
        in ``decomposition_error``."""
        module = cls(**_conv_config(conv, "Tucker"), ranks=ranks)
        factors, err = decompose.tucker(conv.weight.detach(), module.ranks, **kwargs)
        with torch.no_grad():
            for name in ("U_in", "core", "U_out"):
                getattr(module, name).copy_(getattr(factors, name))
        module.decomposition_error = err
        return module._copy_conv(conv)


class BlockSparseConv3d(_FactoredConv3d):
    """A 3D convolution with a block-sparse kernel, running ``lk3d.block_sparse_conv3d``.

    Arguments as ``torch.nn.Conv3d`` (groups included), plus ``block_shape`` ``(bo, bi, bd, bh,
    bw)``, each side dividing its dim of the dense weight ``[out, in/groups, kd, kh, kw]`` (with
    groups > 1 and ``in/groups > 1`` also ``(out/groups) % bo == 0``), and ``density`` in (0, 1]:
    the fraction of blocks stored, drawn at random (``round(density · blocks)``, at least one).

    State: the parameter ``values [nnz, bo, bi, bd, bh, bw]``, the buffers ``row_ptr`` (int32
    ``[out/bo + 1]``) and ``col`` (int32 ``[nnz]``), and ``bias``; ``weight_sparse`` gives them as
    an ``lk3d.BlockSparseWeight``. ``load_state_dict`` takes a state of another pattern (another
    nnz) of the same ``block_shape``: the module takes that pattern. ``prune`` and ``set_mask``
    change the pattern, for dynamic sparsity. While the number of stored blocks stays the same
    (SLaK-style prune-and-regrow in one ``set_mask``), ``values`` keeps its ``Parameter`` object,
    so an optimizer built on it goes on (its per-element state, such as momenta, stays with the
    slot, not the block: reset it for moved blocks if that matters). A change of nnz brings a
    new ``values`` Parameter (with the old ``requires_grad``): rebuild the optimizer then.

    Initialisation: each stored value as ``nn.Conv3d``'s weights (uniform, variance
    ``1 / (3·fan_in)``, ``fan_in = in/groups·kd·kh·kw``), the bias as ``nn.Conv3d``'s.
    """

    def __init__(self, in_channels, out_channels, kernel_size, block_shape, density=1.0,
                 stride=1, padding=0, dilation=1, groups=1, bias=True, padding_mode="zeros",
                 device=None, dtype=None):
        factory_kwargs = dict(device=device, dtype=dtype)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias,
                         padding_mode, factory_kwargs)
        self.groups = positive_int("groups", groups)
        for name, n in (("in_channels", self.in_channels), ("out_channels", self.out_channels)):
            if n % self.groups:
                raise ValueError(f"groups: expected a divisor of {name} = {n}, got {groups}")
        self.weight_shape = (self.out_channels, self.in_channels // self.groups,
                             *self.kernel_size)
        self.block_shape = check_block_shape(self.weight_shape, block_shape, self.groups)
        grid = [n // b for n, b in zip(self.weight_shape, self.block_shape)]
        count = block_count(density, math.prod(grid))
        keys = torch.randperm(math.prod(grid), device=device)[:count].sort().values
        per_row = math.prod(grid[1:])
        row_ptr = torch.zeros(grid[0] + 1, dtype=torch.int32, device=device)
        row_ptr[1:] = torch.bincount(keys // per_row, minlength=grid[0]).cumsum(0)
        self.values = nn.Parameter(torch.empty(count, *self.block_shape, **factory_kwargs))
        self.register_buffer("row_ptr", row_ptr)
        self.register_buffer("col", (keys % per_row).to(torch.int32))
        self._add_bias(factory_kwargs)
        self.reset_parameters()

    @property
    def fan_in(self):
        return self.in_channels // self.groups * math.prod(self.kernel_size)

    def reset_parameters(self):
        _uniform_(self.values, 1.0 / (3 * self.fan_in))
        self._reset_bias()

    @property
    def weight_sparse(self) -> BlockSparseWeight:
        """The kernel as an ``lk3d.BlockSparseWeight`` (its ``values`` is the parameter)."""
        return BlockSparseWeight(self.weight_shape, self.block_shape, self.values, self.row_ptr,
                                 self.col)

    @property
    def nnz(self) -> int:
        return self.values.shape[0]

    @property
    def density(self) -> float:
        return self.nnz / math.prod(n // b for n, b in zip(self.weight_shape, self.block_shape))

    def forward(self, input):
        input, padding = self._padded(input)
        return block_sparse_conv3d_parts(input, self.weight_shape, self.block_shape, self.values,
                                         self.row_ptr, self.col, self.bias, self.stride, padding,
                                         self.dilation, self.groups)

    def _resize(self, nnz):
        """A new ``values`` Parameter of ``nnz`` blocks if that is another count (a resized
        Parameter would clash with the autograd graphs of earlier calls that are still alive)."""
        if nnz != self.values.shape[0]:
            self.values = nn.Parameter(self.values.new_empty(nnz, *self.block_shape),
                                       requires_grad=self.values.requires_grad)
            self.col = self.col.new_empty(nnz)

    def _set_pattern(self, weight):
        """Take ``weight``'s pattern and values (into the same ``values`` Parameter while nnz is
        unchanged); the stale ``values.grad`` is dropped."""
        self._resize(weight.nnz)
        with torch.no_grad():
            self.values.copy_(weight.values)
        self.values.grad = None
        self.row_ptr = weight.row_ptr.clone()
        self.col = weight.col.clone()
        return self

    def prune(self, density=None, threshold=None):
        """Keep, among the stored blocks, those with Frobenius norm > ``threshold`` or the
        largest up to ``density`` of all blocks (``BlockSparseWeight.prune``); returns self.
        For prune-and-regrow at a constant count, give ``set_mask`` the union of
        ``weight_sparse.prune(...).block_mask()`` and the regrown blocks instead."""
        return self._set_pattern(self.weight_sparse.prune(density=density, threshold=threshold))

    def set_mask(self, block_mask):
        """Store exactly the blocks where ``block_mask`` (bool ``[NO, NI, ND, NH, NW]``) holds:
        the current values where stored, zeros for new blocks (``BlockSparseWeight.with_mask``);
        returns self."""
        return self._set_pattern(self.weight_sparse.with_mask(block_mask))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        keys = [prefix + name for name in ("values", "row_ptr", "col")]
        if all(k in state_dict for k in keys):
            values, row_ptr, col = (state_dict[k] for k in keys)
            try:
                BlockSparseWeight(self.weight_shape, self.block_shape, values.detach(),
                                  row_ptr.to(values.device), col.to(values.device))
            except (TypeError, ValueError) as e:
                error_msgs.append(f"{prefix}values/row_ptr/col: not a block-sparse kernel of "
                                  f"shape {self.weight_shape} and block_shape "
                                  f"{self.block_shape}: {e}")
                return
            self._resize(values.shape[0])  # another number of blocks: take it
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _rank_repr(self):
        s = f", block_shape={self.block_shape}, density={self.density:.3g}"
        return s + (f", groups={self.groups}" if self.groups != 1 else "")

    @classmethod
    def from_conv(cls, conv, block_shape, density=None, threshold=None):
        """A ``BlockSparseConv3d`` from ``conv`` (an ``nn.Conv3d``, any groups): its weight's
        blocks kept by ``BlockSparseWeight.from_dense(weight, block_shape, threshold, density)``
        (with neither: every block not all zero), its bias, configuration, training mode and
        ``requires_grad``, on its device and dtype."""
        config = _conv_config(conv, None)
        weight = BlockSparseWeight.from_dense(conv.weight.detach(), block_shape,
                                              threshold=threshold, density=density)
        module = cls(**config, groups=conv.groups, block_shape=block_shape)
        module._set_pattern(weight)
        return module._copy_conv(conv)


def _block_shape_fits(conv, block_shape):
    """Whether ``block_shape`` fits ``conv``'s weight and groups (``BlockSparseConv3d``)."""
    try:
        check_block_shape(tuple(conv.weight.shape), block_shape, conv.groups)
    except ValueError:
        return False
    return True


def convert(model, min_kernel_size=5, inplace=False, to="dense", rank=None, block_shape=None,
            density=None, threshold=None, max_rel_error=None):
    """Swap the large ``torch.nn.Conv3d`` in ``model`` for lk3d's: every one whose largest kernel
    side is at least ``min_kernel_size``, in the form ``to`` names, and return the model.

    ``to="dense"`` (the default) swaps for an ``lk3d.nn.Conv3d`` with the same weights. A swapped
    module keeps its configuration, its ``Parameter`` objects (so data, device, dtype and
    ``requires_grad``), training mode, hooks and any other attribute: it is the same object with
    its class changed to ``lk3d.nn.Conv3d`` (a subclass adding no state, so the change is exact).
    Only modules of type exactly ``nn.Conv3d`` are swapped: subclasses (custom ``forward``,
    parametrized weights) are left as they are.

    ``to="cp"`` replaces each such conv with groups=1 (of type ``nn.Conv3d`` or
    ``lk3d.nn.Conv3d``) by ``CPConv3d.from_conv(conv, rank)``: a new module holding the
    rank-``rank`` CP decomposition of its weight, its bias, configuration, training mode and
    ``requires_grad`` (not its hooks); grouped and depthwise convs stay as they are. ``rank``
    is required with ``"cp"`` and taken by no other form. A conv whose decomposition is more than
    ``max_rel_error`` off its weight (relative error; default ``CP_MAX_REL_ERROR``, 0.3;
    ``math.inf``: never) gets a ``UserWarning`` naming it; ``max_rel_error`` is for ``"cp"`` only.

    ``to="block_sparse"`` replaces each such conv (any groups) that ``block_shape`` fits by
    ``BlockSparseConv3d.from_conv(conv, block_shape, density, threshold)``: its weight's blocks
    kept by norm (the top ``density`` fraction, those above ``threshold``, or with neither every
    block not all zero), its bias, configuration, training mode and ``requires_grad`` (not its
    hooks); a conv whose weight ``block_shape`` does not divide (or whose block rows would span
    groups) stays as it is. ``block_shape`` is required with ``"block_sparse"``; it, ``density``
    and ``threshold`` are taken by no other form.

    ``model`` may itself be a conv (then the result may be a new module). Shared modules stay
    shared. With ``inplace=False`` (the default) ``model`` is deep-copied first and left
    untouched; with ``inplace=True`` it is converted in place (for ``"dense"`` an optimizer built
    on its parameters still holds the right ones; ``"cp"`` and ``"block_sparse"`` bring new
    parameters).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(min_kernel_size, bool) or not isinstance(min_kernel_size, Integral):
        raise TypeError(f"min_kernel_size: expected a positive int, got {min_kernel_size!r} "
                        f"({type(min_kernel_size).__name__})")
    if min_kernel_size < 1:
        raise ValueError(f"min_kernel_size: expected a positive int, got {min_kernel_size}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace: expected a bool, got {inplace!r} ({type(inplace).__name__})")
    if not isinstance(to, str) or to not in _CONVERT_TO:
        supported = ", ".join(repr(t) for t in _CONVERT_TO)
        raise ValueError(f"to: expected one of {supported} (the forms supported so far), "
                         f"got {to!r}")
    if to == "cp":
        if isinstance(rank, bool) or not isinstance(rank, Integral) or rank < 1:
            integral = isinstance(rank, Integral) and not isinstance(rank, bool)
            error = ValueError if rank is None or integral else TypeError
            raise error(f"rank: expected a positive int with to='cp' (to='dense' takes none), "
                        f"got {rank!r}")
        limit = _max_rel_error(max_rel_error)
    elif rank is not None:
        raise ValueError(f"rank: only to='cp' takes a rank, got rank={rank!r} with to={to!r}")
    if to != "cp" and max_rel_error is not None:
        raise ValueError(f"max_rel_error: only to='cp' takes a max_rel_error, got "
                         f"max_rel_error={max_rel_error!r} with to={to!r}")
    if to == "block_sparse":
        if block_shape is None:
            raise ValueError("block_shape: expected a tuple of 5 positive ints (bo, bi, bd, bh, "
                             "bw) with to='block_sparse' (to='dense' and to='cp' take none), "
                             "got None")
        five_ints("block_shape", block_shape)
        if threshold is not None and density is not None:
            raise ValueError(f"threshold, density: expected at most one of them, got "
                             f"threshold={threshold!r} and density={density!r}")
        if threshold is not None:
            check_threshold(threshold)
        if density is not None:
            block_count(density, 1)
    else:
        for name, value in (("block_shape", block_shape), ("density", density),
                            ("threshold", threshold)):
            if value is not None:
                raise ValueError(f"{name}: only to='block_sparse' takes a {name}, got "
                                 f"{name}={value!r} with to={to!r}")

    if not inplace:
        model = copy.deepcopy(model)
    if to == "dense":
        for module in model.modules():
            if type(module) is nn.Conv3d and max(module.kernel_size) >= min_kernel_size:
                module.__class__ = Conv3d
        return model

    def matches(module):
        if type(module) not in (nn.Conv3d, Conv3d) or max(module.kernel_size) < min_kernel_size:
            return False
        if to == "cp":
            return module.groups == 1
        return _block_shape_fits(module, block_shape)

    done = {}

    def replacement(conv, name):
        if id(conv) not in done:
            if to == "cp":
                new = CPConv3d.from_conv(conv, rank, max_rel_error=math.inf)
                if new.decomposition_error > limit:
                    text = _cp_error_text(conv, rank, new.decomposition_error, limit)
                    warnings.warn(f"lk3d.nn.convert(to='cp'): {name}: {text}", UserWarning,
                                  stacklevel=3)
            else:
                new = BlockSparseConv3d.from_conv(conv, block_shape, density=density,
                                                  threshold=threshold)
            done[id(conv)] = new
        return done[id(conv)]

    if matches(model):
        return replacement(model, "the model")
    for prefix, module in list(model.named_modules()):
        for name, child in list(module._modules.items()):  # shared children at every name
            if matches(child):
                setattr(module, name, replacement(child, f"{prefix}.{name}" if prefix else name))
    return model
